"""Fault injection: processes killed or interrupted at chosen points, full and read-only
filesystems, unreadable files, corrupt files and non-finite tensors. After each fault: no partial
output under a final name, one line on stderr (exit 2, or 130 when interrupted), inputs unchanged
byte for byte, and a re-run completes (and removes what a killed run left behind)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from factory import make_adapter, save_base
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error, cli

pytest.importorskip("peft")
pytest.importorskip("transformers")

# Runs the command line with a pause at a chosen point: the n-th call of a hooked function
# creates MARKER and sleeps, so that the test can deliver a signal exactly there.
DRIVER = r"""
import os, sys, time
marker, point, nth, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
calls = [0]

def pause():
    calls[0] += 1
    if calls[0] == nth:
        open(marker, "w").close()
        time.sleep(600)

def before(owner, name):
    original = getattr(owner, name)
    def hooked(*a, **k):
        pause()
        return original(*a, **k)
    setattr(owner, name, hooked)

if point == "analysis":
    import intruder_ext.detection as m
    before(m, "analyse_layer")
elif point == "write":
    import intruder_ext.checkpoints as m
    before(m.SafetensorsWriter, "write")
elif point == "rename":
    import intruder_ext.checkpoints as m
    before(m.os, "rename")
elif point == "cache-entry":
    import intruder_ext.cache as m
    before(m.SpectrumCache, "get")
elif point == "cache-store":
    import intruder_ext.cache as m
    before(m.os, "replace")
from intruder_ext.cli import main
sys.exit(main(argv))
"""


def sha256_tree(path):
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_base("llama_gqa", root / "base")
    make_adapter("llama_gqa", root / "base", root / "adapter")
    return root


@pytest.fixture
def unchanged(inputs):
    """Every input file, hashed before the test and checked after it."""
    before = sha256_tree(inputs)
    yield
    assert sha256_tree(inputs) == before


def env():
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def start(tmp_path, point, nth, *argv):
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), point, str(nth),
                             *map(str, argv)], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the pause: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("never reached the pause")
        time.sleep(0.05)
    return proc


def leftovers(directory, name):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}.tmp-"))


MITIGATE_POINTS = [("analysis", 3), ("write", 1), ("rename", 1)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("point,nth", MITIGATE_POINTS, ids=[p for p, _ in MITIGATE_POINTS])
@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merge"])
def test_mitigate_killed_or_interrupted(inputs, tmp_path, capsys, unchanged, sig, point, nth,
                                        merge):
    out = tmp_path / "out"
    argv = ["mitigate", inputs / "base", inputs / "adapter", "--out", out, "--cache-dir",
            tmp_path / "cache", "-q"] + (["--merge"] if merge else [])
    proc = start(tmp_path, point, nth, *argv)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:
        # one line, after the calibration warning of this 32-wide model when it came first
        lines = err.strip().splitlines()
        assert proc.returncode == 130 and lines[-1] == "intruder-ext: interrupted", err
        assert all(line.startswith("intruder-ext: warning: epsilon=") for line in lines[:-1])
        assert leftovers(tmp_path, "out") == []  # cleaned up on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
    res = cli(capsys, *argv)
    assert res.returncode == 0, res.stderr
    assert leftovers(tmp_path, "out") == []  # the re-run removed the killed run's temporary
    assert (out / ("model.safetensors.index.json" if merge else "adapter_model.safetensors")) \
        .is_file()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("point", ["cache-entry", "cache-store"])
def test_cache_killed_or_interrupted(inputs, tmp_path, capsys, unchanged, sig, point):
    from intruder_ext.cache import SpectrumCache
    cache = tmp_path / "cache"
    argv = ["cache", inputs / "base", "--cache-dir", cache, "-q"]
    proc = start(tmp_path, point, 4, *argv)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    stored = SpectrumCache(cache)
    assert stored.verify() == []  # what is there is whole
    res = cli(capsys, *argv)
    assert res.returncode == 0, res.stderr
    entries = stored.entries()
    assert len(entries) == 16 and stored.verify() == []
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no stale temporaries


@pytest.mark.parametrize("delay", [0.4, 1.0, 2.0])
def test_interrupt_during_start_up_is_one_line(inputs, tmp_path, delay):
    """Ctrl-C while the command loads torch and reads headers (earlier, in the interpreter's own
    start-up, Python itself reports it: nothing a program can catch there)."""
    proc = subprocess.Popen([sys.executable, "-m", "intruder_ext", "detect", str(inputs / "base"),
                             str(inputs / "adapter"), "-q", "--cache-dir", str(tmp_path / "c")],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode in (130, -signal.SIGINT, 0), (proc.returncode, err)
    if proc.returncode == 130:  # warnings the command printed before it may precede the line
        *before, last = err.strip().splitlines()
        assert last == "intruder-ext: interrupted", err
        assert all(line.startswith("intruder-ext: warning: ") for line in before), err


def test_interrupt_wrapped_by_python_is_one_line(monkeypatch, capsys):
    """A Ctrl-C inside an import's class creation reaches the command wrapped in a RuntimeError
    ("Error calling __set_name__", seen in CI when SIGINT hit matplotlib's import): still an
    interruption, not an internal error."""
    import intruder_ext.cli as cli

    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("Error calling __set_name__ on '_axis_method_wrapper'") \
                from interrupt
    monkeypatch.setattr(cli, "cmd_cache", interrupted_import)
    assert cli.main(["cache", "--list"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["intruder-ext: interrupted"]


def test_interrupt_turned_into_another_error_is_one_line(monkeypatch, capsys):
    """A Ctrl-C during numpy's import (under torch's) left numpy half-initialised, and the next
    import attempt raised "ImportError: cannot load module more than once per process" with no
    trace of the interrupt (seen in CI): the signal main() saw makes it an interruption."""
    import intruder_ext.cli as cli

    def interrupted_import(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            pass  # swallowed, as the import machinery did
        raise ImportError("cannot load module more than once per process")
    monkeypatch.setattr(cli, "cmd_cache", interrupted_import)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh process
    try:
        assert cli.main(["cache", "--list"]) == 130
        assert capsys.readouterr().err.strip().splitlines() == ["intruder-ext: interrupted"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        monkeypatch.setattr(cli, "cmd_cache", lambda args: 0)
        assert cli.main(["cache", "--list"]) == 0  # the next call starts afresh
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------- filesystems
@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (full after the first shard of a merged model); skipped where this
    machine cannot mount one."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk(inputs, small_fs, capsys, unchanged, tmp_path):
    out = small_fs / "merged"
    res = cli(capsys, "mitigate", inputs / "base", inputs / "adapter", "--out", out, "--merge",
              "--cache-dir", tmp_path / "cache", "-q")
    assert_user_error(res, f"cannot write {out}", "no space left on the device")
    assert list(small_fs.iterdir()) == []  # the partial temporary directory is gone
    res = cli(capsys, "detect", inputs / "base", inputs / "adapter", "--report",
              small_fs / "report.md", "--cache-dir", tmp_path / "cache", "-q")
    assert_user_error(res, "cannot write", "no space left on the device")
    assert list(small_fs.iterdir()) == []


def test_read_only_output_location(inputs, small_fs, capsys, unchanged, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for argv in (["mitigate", inputs / "base", inputs / "adapter", "--out", small_fs / "o"],
                 ["detect", inputs / "base", inputs / "adapter", "--json", small_fs / "r.json"]):
        t0 = time.perf_counter()
        res = cli(capsys, *argv, "--cache-dir", tmp_path / "cache", "-q")
        assert_user_error(res, "is on a read-only filesystem")
        assert time.perf_counter() - t0 < 5  # refused before any work


def test_read_only_cache_directory_is_best_effort(inputs, small_fs, capsys, unchanged, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    res = cli(capsys, "detect", inputs / "base", inputs / "adapter", "--json", tmp_path / "r.json",
              "--cache-dir", small_fs / "cache")
    assert res.returncode == 0, res.stderr
    assert str(small_fs / "cache") in res.stderr  # one warning naming the directory
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["intruders"] > 0


def test_cache_dir_that_is_a_file(inputs, capsys, unchanged, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = cli(capsys, "detect", inputs / "base", inputs / "adapter", "--cache-dir",
              tmp_path / "afile", "-q")
    assert res.returncode == 0, res.stderr
    assert "afile" in res.stderr


def as_nobody(*argv, **kwargs):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, *map(str, argv)], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_permission_denied_is_not_reported_as_missing(inputs, tmp_path):
    """Run as an unprivileged user: an unreadable shard is 'permission denied', not missing."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run a command as another user")
    probe = as_nobody("-c", "import intruder_ext.ops", cwd="/", env=env())
    if probe.returncode != 0:
        pytest.skip("an unprivileged user cannot import this install of intruder_ext here: "
                    + (probe.stderr.strip().splitlines() or ["?"])[-1])
    shared = tmp_path / "shared"
    shutil.copytree(inputs / "base", shared / "base")
    shutil.copytree(inputs / "adapter", shared / "adapter")
    for p in [tmp_path, *shared.rglob("*"), shared]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shard = sorted((shared / "base").glob("model-*.safetensors"))[0]
    shard.chmod(0o000)
    res = as_nobody("-m", "intruder_ext", "detect", shared / "base", shared / "adapter",
                    "--no-cache", "-q", cwd="/", env={**env(), "HOME": "/nonexistent"})
    assert_user_error(res, shard.name, "permission denied")


def test_permission_denied_message(inputs, tmp_path, capsys, monkeypatch):
    """The same, in-process, where no other user can be had: the error an unreadable file
    raises is reported as such."""
    import builtins
    shard = sorted((inputs / "base").glob("model-*.safetensors"))[0]
    real_open = builtins.open

    def guarded(path, *a, **k):
        if os.fspath(path) == os.fspath(shard):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", guarded)
    assert_user_error(cli(capsys, "detect", inputs / "base", inputs / "adapter", "-q",
                          "--no-cache"), shard.name, "cannot read (permission denied)")


# ---------------------------------------------------------------------------------- corrupt input
def edited_adapter(inputs, tmp_path, config=None, tensors=None):
    dst = tmp_path / "adapter"
    shutil.copytree(inputs / "adapter", dst)
    if config is not None:
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        save_file(tensors(t), dst / "adapter_model.safetensors")
    return dst


def poisoned(key_end, value):
    def edit(t):
        key = next(k for k in t if k.endswith(key_end))
        t[key] = t[key].clone()
        t[key].view(-1)[5] = value
        return t
    return edit


@pytest.mark.parametrize("config, fragments", [
    ([{"r": 4}], ["adapter_config.json: expected a JSON object, got list"]),
    ({"peft_type": "LORA", "r": "four"}, ["r must be a positive integer (got 'four')"]),
    ({"peft_type": "LORA", "r": 4, "use_dora": True}, ["DoRA"]),
])
def test_malformed_adapter_config(inputs, tmp_path, capsys, unchanged, config, fragments):
    adapter = edited_adapter(inputs, tmp_path, config=config)
    for command in ("detect", "mitigate"):
        extra = ["--out", tmp_path / "o"] if command == "mitigate" else []
        assert_user_error(cli(capsys, command, inputs / "base", adapter, *extra), *fragments)
    assert not (tmp_path / "o").exists()


def test_garbage_adapter_file(inputs, tmp_path, capsys, unchanged):
    adapter = edited_adapter(inputs, tmp_path)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    assert_user_error(cli(capsys, "detect", inputs / "base", adapter),
                      "adapter_model.safetensors", "not a safetensors file")


@pytest.mark.parametrize("tensor, value", [("q_proj.lora_A.weight", float("nan")),
                                           ("v_proj.lora_B.weight", float("inf"))])
def test_nonfinite_adapter(inputs, tmp_path, capsys, unchanged, tensor, value):
    adapter = edited_adapter(inputs, tmp_path, tensors=poisoned("layers.1.self_attn." + tensor,
                                                                value))
    module = "model.layers.1.self_attn." + tensor.split(".")[0]
    what = tensor.split(".")[1]
    assert_user_error(cli(capsys, "mitigate", inputs / "base", adapter, "--out", tmp_path / "o",
                          "-q"), f"module '{module}': {what} has non-finite values")
    assert not (tmp_path / "o").exists()
    res = cli(capsys, "detect", inputs / "base", adapter, "--skip-nonfinite", "--json",
              tmp_path / "r.json", "-q", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "r.json").read_text())  # valid JSON, the module reported
    assert [s["name"] for s in data["skipped"]] == [module]
    assert len(data["modules"]) == 13


def test_nonfinite_base_weight(inputs, tmp_path, capsys, unchanged):
    base = tmp_path / "base"
    shutil.copytree(inputs / "base", base)
    shard = next(p for p in sorted(base.glob("model-*.safetensors"))
                 if any(k.endswith("layers.0.self_attn.q_proj.weight") for k in load_file(p)))
    tensors = load_file(shard)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, shard)
    res = cli(capsys, "mitigate", base, inputs / "adapter", "--out", tmp_path / "o", "--merge",
              "-q")
    assert_user_error(res, "module 'model.layers.0.self_attn.q_proj': the base weight has "
                           "non-finite values")
    assert not (tmp_path / "o").exists()


def test_outputs_never_overwrite(inputs, tmp_path, capsys, unchanged):
    """--json/--report may not point into an input (the adapter's own config included, even
    with --force) nor at an existing file without --force; checked before any work."""
    config = inputs / "adapter" / "adapter_config.json"
    for flag in ("--json", "--report"):
        assert_user_error(cli(capsys, "detect", inputs / "base", inputs / "adapter", flag, config,
                              "--force"), "is inside the TUNED directory")
    (tmp_path / "r.json").write_text("keep me")
    assert_user_error(cli(capsys, "detect", inputs / "base", inputs / "adapter", "--json",
                          tmp_path / "r.json"), "already exists (use --force")
    assert (tmp_path / "r.json").read_text() == "keep me"
    res = cli(capsys, "detect", inputs / "base", inputs / "adapter", "--json", tmp_path / "r.json",
              "--force", "-q", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0 and json.loads((tmp_path / "r.json").read_text())["modules"]
    assert_user_error(cli(capsys, "detect", inputs / "base", inputs / "adapter", "--plots",
                          inputs / "base" / "plots"), "is inside the BASE directory")


def test_full_fine_tune_with_nonfinite_weight(inputs, tmp_path, capsys, unchanged):
    tuned = tmp_path / "tuned"
    shutil.copytree(inputs / "base", tuned)
    shard = sorted(tuned.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = tensors[key].clone()
    tensors[key][1, 1] = float("inf")
    save_file(tensors, shard)
    res = cli(capsys, "detect", inputs / "base", tuned, "--json", tmp_path / "r.json", "-q")
    assert_user_error(res, f"module '{key[:-len('.weight')]}': the tuned weight has non-finite")
    assert not (tmp_path / "r.json").exists()
    assert torch.isinf(load_file(shard)[key]).any()  # the input stays as the user made it


def test_demo_arguments_checked_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, fragment in ((["--out", tmp_path / "file"], "exists and is not a directory"),
                           (["--out", tmp_path / "no" / "dir"], "parent directory"),
                           (["--model", tmp_path], "is not a transformers model directory")):
        t0 = time.perf_counter()
        assert_user_error(cli(capsys, "demo", *argv, "-q"), fragment)
        assert time.perf_counter() - t0 < 5, "checked only after training"
