"""Reading a deployment bundle (tasks/bundle.py writes one): its manifest, its names, its files' sha256.

Nothing here imports torch: run_bundle.py, the device side, uses it with onnxruntime, numpy and Pillow only.
"""

import hashlib
import json
import os
import re

FORMAT, VERSION = "petah-bundle", 1
MANIFEST, BASE_GRAPH, BASE_DATA = "manifest.json", "base.onnx", "base.data"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class BundleError(ValueError):
    """A bundle folder or a request on it that is wrong in a way the user can fix; str() names the file and fix."""


# -----------------------------------------------------------------------------
# reading a bundle


def check_name(name: str) -> str:
    """A task name is a file-name part: letters, digits, _ . + -, at most 64, no '/', no '..'."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise BundleError(f"task name {name!r} is not allowed: use letters, digits and _ . + - (at most 64, no '/' "
                          f"and no '..'), e.g. cub or cars_v2")
    return name


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def read_manifest(folder: str) -> dict:
    """The manifest of the bundle in `folder`; BundleError if it is no bundle (or of another version)."""
    path = os.path.join(folder, MANIFEST)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BundleError(f"bundle {folder} is a file, not a bundle folder (export.py --bundle DIR writes a folder)")
    if not os.path.isdir(folder):
        raise BundleError(f"bundle {folder} does not exist (export.py --bundle {folder} ... creates it)")
    if not os.path.isfile(path):
        raise BundleError(f"{folder} is not a bundle: it has no {MANIFEST} (export.py --bundle writes one; choose "
                          f"an empty or new folder to create a bundle)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not readable JSON ({e}): the bundle is damaged; re-create it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a bundle manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{path} has bundle version {manifest.get('version')!r}; this code reads version "
                          f"{VERSION}: re-create the bundle with this export.py")
    if not isinstance(manifest.get("base"), dict) or not isinstance(manifest.get("tasks"), dict):
        raise BundleError(f"{path} lacks its \"base\" or \"tasks\" entry: the bundle is damaged; re-create it")
    return manifest


def verify_files(folder: str, manifest: dict, names=None) -> None:
    """Check the bytes and sha256 of the base's files and of the tasks `names` (default all) against the
    manifest; BundleError naming the first file that is missing or changed."""
    names = list(manifest["tasks"]) if names is None else list(names)
    entries = [("the base", manifest["base"]["files"])]
    for n in names:
        if n not in manifest["tasks"]:
            raise BundleError(f"bundle {folder} has no task {n!r}; its tasks: {', '.join(manifest['tasks']) or 'none'}")
        entries.append((f"task {n!r}", manifest["tasks"][n]["files"]))
    for what, files in entries:
        for fname, want in files.items():
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise BundleError(f"bundle {folder}: {fname} ({what}) is missing; re-create the bundle or re-add "
                                  f"the task with --replace")
            if os.path.getsize(path) != want["bytes"] or sha256_file(path) != want["sha256"]:
                raise BundleError(f"bundle {folder}: {fname} ({what}) does not match the sha256 in {MANIFEST} (the "
                                  f"file was changed or damaged); re-create the bundle or re-add the task with "
                                  f"--replace")
