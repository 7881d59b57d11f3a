"""Every user mistake, in every command, is one `error:` line and exit code 2, before any work (subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_cli import assert_user_error, cli


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("autoglm-trt ") and out.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("command", [["generate", "{model}", "-p", "hi"], ["serve", "{model}"],
                                     ["calibrate", "{model}", "-o", "{tmp}/c"], ["init-random", "{tmp}/r"]])
@pytest.mark.parametrize("flag,value", [("--dtype", "bfloat61"), ("--device", "cdua")])
def test_bad_dtype_or_device_is_one_line_in_every_command(command, flag, value, tiny_model_dir, tmp_path):
    args = [a.format(model=tiny_model_dir, tmp=tmp_path) for a in command]
    assert_user_error(cli(*args, flag, value), flag, repr(value))
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()  # nothing half-written


def test_vllm_dtype_spellings_are_accepted(tmp_path):
    from autoglm_trt.utils.choices import dtype_choice

    assert [dtype_choice(v) for v in ("half", "float", "bf16", "BFloat16", "auto")] == \
        ["float16", "float32", "bfloat16", "bfloat16", "auto"]


def test_unknown_option_is_one_line():
    assert_user_error(cli("serve", "x", "--no-such-flag"), "No such option", "--no-such-flag", "serve --help")


@pytest.mark.parametrize("command", ["build", "export"])
def test_output_naming_an_existing_file_is_one_line(command, tiny_model_dir, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    assert_user_error(cli(command, str(tiny_model_dir), "-o", str(target)), "is a file")


def test_init_random_into_a_non_empty_directory_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    assert_user_error(cli("init-random", str(tmp_path / "m")), "not empty")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep.txt"]


def test_atomic_directory_leaves_nothing_when_the_write_fails(tmp_path):
    from autoglm_trt.utils.atomic_dir import atomic_directory

    out = tmp_path / "new" / "deeper" / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "model-00001.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # the parents it created went too
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"] and [p.name for p in out.parent.iterdir()] == ["ckpt"]


def test_serve_a_hub_id_missing_from_the_cache_is_one_line(tmp_path):
    env_cli = subprocess.run([sys.executable, "-m", "autoglm_trt.cli", "serve", "--model", "zai-org/AutoGLM-Phone-9B"],
                             capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert_user_error(env_cli, "zai-org/AutoGLM-Phone-9B", "Hugging Face cache", "hf download")


@pytest.mark.parametrize("args,says", [(["--max-model-len", "0"], "max_model_len"),
                                       (["--model", "elsewhere"], "given twice"),
                                       (["--log-format", "xml"], "--log-format"),
                                       (["--mm-process-config", '{"video": {}}'], "image"),
                                       (["--tp", "0"], "tensor_parallel_size")])
def test_bad_serve_options_are_one_line_before_listening(tiny_model_dir, args, says):
    out = cli("serve", str(tiny_model_dir), "--port", "0", "--grpc-port", "-1", *args)
    assert_user_error(out, says)
    assert "listening" not in out.stderr
