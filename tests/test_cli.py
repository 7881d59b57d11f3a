"""The CLI as a user runs it (subprocess): init-random, generate, doctor, and one-line errors for mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoglm_trt.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.stderr.strip().endswith(errors[0]), out.stderr  # progress bars may precede
    for w in words:
        assert w in errors[0]


def test_init_random_and_generate_with_image(tmp_path):
    model = tmp_path / "m"
    out = cli("init-random", str(model), "--preset", "tiny", "--seed", "3")
    assert out.returncode == 0, out.stderr
    names = {p.name for p in model.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "generation_config.json"} <= names
    img = tmp_path / "shot.png"
    Image.new("RGB", (300, 640), "white").save(img)
    gen = cli("generate", str(model), "-p", "打开设置", "--image", str(img), "--max-tokens", "6", "--device", "cpu")
    assert gen.returncode == 0, gen.stderr
    assert "[finish_reason: length]" in gen.stdout


def test_doctor_reports_the_machine():
    out = cli("doctor")
    assert out.returncode == 0, out.stderr
    for key in ("torch", "CUDA", "onnxruntime", "tensorrt"):
        assert key in out.stdout


def test_missing_directory_is_one_line(tmp_path):
    assert_user_error(cli("generate", str(tmp_path / "nope"), "-p", "hi"), "does not exist")


def test_other_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_user_error(cli("generate", str(tmp_path), "-p", "hi"), "llama")


def test_corrupt_weights_are_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_user_error(cli("generate", str(bad), "-p", "hi", "--device", "cpu"), shard.name)


def test_unreadable_image_is_refused(tiny_model_dir, tmp_path):
    img = tmp_path / "broken.png"
    img.write_bytes(b"not a png at all")
    assert_user_error(cli("generate", str(tiny_model_dir), "-p", "hi", "--image", str(img), "--device", "cpu"))


def test_older_key_layout_loads(tiny_model_dir, tmp_path, our_model):
    """Checkpoints saved before transformers 5 use `model.layers.*` / `visual.*` keys."""
    from safetensors.torch import load_file, save_file

    from autoglm_trt.models.loader import load_model

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    tensors = {}
    for f in sorted(tiny_model_dir.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            tensors[k] = v
    save_file(tensors, str(old / "model.safetensors"))
    model = load_model(old, dtype="float32", show_progress=False)
    ids = torch.arange(100, 120)
    pos = ids.new_tensor(range(20)).expand(3, -1)
    with torch.no_grad():
        a = model.compute_logits(model(model.embed(ids), pos))
        b = our_model.compute_logits(our_model(our_model.embed(ids), pos))
    assert torch.equal(a, b)


@pytest.mark.parametrize("args", [["init-random"], ["generate"], ["init-random", "x", "--preset", "huge"]])
def test_usage_errors_exit_2(args, tmp_path):
    out = cli(*[a if a != "x" else str(tmp_path / "x") for a in args])
    assert out.returncode == 2 and "Traceback" not in out.stderr
