"""tasks/task_file.py: save_task / read_task, the task type (formerly "kind"), files read_task refuses."""
import copy
import json
import os

import pytest
import torch
from nets import perturb

from lora import load_adapters, read_safetensors, write_safetensors
from methods import apply_method
from models import create_model
from tasks.task_file import TASK_TYPES, read_task, save_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest.py


@pytest.fixture(scope="module")
def petah(tmp_path_factory):
    """ef_tiny base and a PETAH task of it (rc 2, trained norms, a 7-class head), its file written by save_task."""
    d = tmp_path_factory.mktemp("task")
    torch.manual_seed(0)
    base = create_model("ef_tiny", num_classes=3, img_size=64).eval()
    m = copy.deepcopy(base)
    m.reset_classifier(7)
    apply_method(m, "ef_tiny", "petah", rc=2, train_norms=True)
    perturb(m)
    save_task(m, d / "petah.safetensors", meta=dict(task_type="cls", model="ef_tiny", method="petah", num_classes=7))
    return base, m, d / "petah.safetensors"


def test_task_file(tmp_path, petah):
    base, trained, path = petah
    t = read_task(path)
    assert t.task_type == "cls" and t.num_classes == 7
    assert t.meta == dict(task_type="cls", model="ef_tiny", method="petah", num_classes=7)
    assert torch.equal(t.tensors["head.weight"], trained.head.weight)
    assert "stem.norm1.running_mean" in t.tensors and "stem.conv1.lora_A" in t.tensors  # BN stats + conv-LoRA
    assert t.adapters["stem.conv1"]["type"] == "conv_lora" and t.adapters["stem.conv1"]["r"] == 2
    # lora.load_adapters reads a task file into a model with the same adapters
    m = copy.deepcopy(base)
    m.reset_classifier(7)
    apply_method(m, "ef_tiny", "petah", rc=2, train_norms=True)
    load_adapters(m, path)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in t.tensors.items())
    # the file mode follows the umask; a failed save leaves no file behind
    old = os.umask(0o027)
    try:
        save_task(m, tmp_path / "u.safetensors", meta=dict(task_type="cls", model="ef_tiny", method="petah"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "u.safetensors").st_mode & 0o777 == 0o640
    with pytest.raises(TypeError, match="JSON"):
        save_task(m, tmp_path / "bad.safetensors", meta=dict(task_type="cls", model="x", method="y", f=object()))
    with pytest.raises(ValueError, match="lacks"):
        save_task(m, tmp_path / "bad.safetensors", meta=dict(task_type="cls"))
    with pytest.raises(ValueError, match=r"meta\['task_type'\] must be one of \('cls', 'seg', 'det'\)"):
        save_task(m, tmp_path / "bad.safetensors", meta=dict(task_type="pose", model="x", method="y"))
    assert sorted(os.listdir(tmp_path)) == ["u.safetensors"]


def user_meta(path) -> dict:
    return json.loads(read_safetensors(path)[1]["user"])


def rewrite(src, dst, **changes):
    """src's tensors and metadata, with the metadata entries `changes` (JSON-encoded) replaced."""
    tensors, metadata = read_safetensors(src)
    write_safetensors(tensors, dst, {**metadata, **{k: json.dumps(v) for k, v in changes.items()}})
    return dst


def test_task_type_and_the_older_kind(tmp_path, petah):
    """save_task writes "task_type", also when a caller still says "kind"; a file written before the rename (its
    metadata says "kind") reads with the same task_type."""
    _, m, path = petah
    assert TASK_TYPES == ("cls", "seg", "det")
    save_task(m, tmp_path / "k.safetensors", meta=dict(kind="seg", model="ef_tiny", method="petah"))
    assert user_meta(tmp_path / "k.safetensors") == dict(task_type="seg", model="ef_tiny", method="petah")
    assert read_task(tmp_path / "k.safetensors").task_type == "seg"
    old = rewrite(path, tmp_path / "old.safetensors", user=dict(kind="det", model="ef_tiny", method="petah"))
    assert read_task(old).meta == dict(task_type="det", model="ef_tiny", method="petah")  # "kind" read as task_type
    with pytest.raises(ValueError, match="task_type 'cls' and kind 'seg'"):
        save_task(m, tmp_path / "x.safetensors", meta=dict(task_type="cls", kind="seg", model="a", method="b"))
    with pytest.raises(ValueError, match=r"meta\['task_type'\] must be one of"):
        save_task(m, tmp_path / "x.safetensors", meta=dict(kind="pose", model="a", method="b"))
    assert not (tmp_path / "x.safetensors").exists()


BAD_FILES = [  # id, how to make the file from the good one (src, tmp_path) -> path, phrase
    ("a directory", lambda src, d: d, "is a directory, not a file"),
    ("a run's directory", lambda src, d: (d / "adapters.safetensors").write_bytes(src.read_bytes()) and d,
     "pass {d}" + os.sep + "adapters.safetensors"),
    ("adapters a list", lambda src, d: rewrite(src, d / "t.safetensors", adapters=["stem.conv1"]),
     "its 'adapters' metadata must be {module name: adapter config with a 'type'}, got ['stem.conv1']"),
    ("adapter config a number", lambda src, d: rewrite(src, d / "t.safetensors", adapters={"stem.conv1": 2}),
     "its 'adapters' metadata must be"),
    ("trainable a dict", lambda src, d: rewrite(src, d / "t.safetensors", trainable={"head.weight": 1}),
     "its 'trainable' metadata must be a list of tensor names"),
    ("meta a list", lambda src, d: rewrite(src, d / "t.safetensors", user=["cls"]),
     "its 'user' metadata must be the task description, a JSON object"),
]


@pytest.mark.parametrize("make, phrase", [r[1:] for r in BAD_FILES], ids=[r[0] for r in BAD_FILES])
def test_read_task_refuses(tmp_path, petah, make, phrase):
    path = make(petah[2], tmp_path)
    with pytest.raises(ValueError) as e:
        read_task(path)
    assert str(path) in str(e.value) and phrase.replace("{d}", str(tmp_path)) in str(e.value), str(e.value)
