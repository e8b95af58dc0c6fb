"""tasks/manifest.py: the bundle's manifest read and checked without torch: task names, the sha256 of every file,
folders that are not bundles (the bundle written end to end: tests/test_tasks_bundle.py)."""

import hashlib
import json

import pytest

from tasks.manifest import FORMAT, MANIFEST, VERSION, BundleError, check_name, file_entry, read_manifest, verify_files


@pytest.mark.parametrize("name", ["cub", "cars_v2", "a.b+c-d", "x" * 64])
def test_names_a_file_name_part_can_hold(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", "../x", "-x", "x" * 65, "a b", "é"])
def test_names_that_could_leave_the_folder_or_collide_are_refused(name):
    with pytest.raises(BundleError, match="is not allowed"):
        check_name(name)


def bundle(tmp_path):
    """A bundle folder with one base file and one task file, its manifest written from file_entry."""
    (tmp_path / "base.data").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "task-a.onnx").write_bytes(b"task bytes")
    manifest = dict(format=FORMAT, version=VERSION, base=dict(files={"base.data": file_entry(tmp_path / "base.data")}),
                    tasks=dict(a=dict(files={"task-a.onnx": file_entry(tmp_path / "task-a.onnx")})))
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_file_entry_is_the_size_and_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than the 1 MiB read block
    (tmp_path / "f").write_bytes(data)
    assert file_entry(tmp_path / "f") == dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_a_changed_or_missing_file_is_named(tmp_path):
    manifest = bundle(tmp_path)
    assert read_manifest(str(tmp_path)) == manifest
    verify_files(str(tmp_path), manifest)  # as written: nothing to say
    (tmp_path / "task-a.onnx").write_bytes(b"task bytez")  # same size, other bytes
    with pytest.raises(BundleError, match=r"task-a\.onnx \(task 'a'\) does not match the sha256"):
        verify_files(str(tmp_path), manifest)
    verify_files(str(tmp_path), manifest, names=[])  # the base alone is still intact
    (tmp_path / "base.data").unlink()
    with pytest.raises(BundleError, match=r"base\.data \(the base\) is missing"):
        verify_files(str(tmp_path), manifest, names=[])
    with pytest.raises(BundleError, match="has no task 'b'; its tasks: a"):
        verify_files(str(tmp_path), manifest, names=["b"])


@pytest.mark.parametrize("content, phrase", [
    (None, "is not a bundle: it has no manifest.json"),
    ("{not json", "is not readable JSON"),
    (json.dumps({"format": "other"}), "is not a bundle manifest"),
    (json.dumps({"format": FORMAT, "version": VERSION + 1}), "this code reads version"),
    (json.dumps({"format": FORMAT, "version": VERSION}), "lacks its \"base\" or \"tasks\" entry"),
])
def test_folders_that_are_not_bundles(tmp_path, content, phrase):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(BundleError, match=phrase):
        read_manifest(str(tmp_path))
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(str(tmp_path / "nowhere"))
