"""The command-line tools on bad input: one `error: <what>, <where>` line on stderr and exit status 2
(`--verbose`: the traceback instead, still 2); bugs still raise with a traceback (dsjax/cli.py).

The CLIs run as subprocesses (all at once, each fails before any JAX compilation); the helper's
rules are checked in-process.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from dsjax import cli
from dsjax.hf.safetensors_io import CheckpointFormatError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/smoke.py"  # relative to REPO_ROOT, the subprocesses' working directory


def _cases(root: str) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (the command after `python -m`, fragments its error line must contain)."""
    missing = os.path.join(root, "no_such_dir")
    corrupt = os.path.join(root, "corrupt")  # an HF directory whose config.json is not JSON
    out = os.path.join(root, "out")
    workdir = os.path.join(root, "workdir")
    train = ["experiments.train", "--workdir", workdir, "--config"]
    return {
        "train_missing_config": (train + ["configs/no_such_config.py"],
                                 ["--config=configs/no_such_config.py: no such config file"]),
        "train_unknown_key": (train + [SMOKE, "--config.no_such_key=1"],
                              ["no such config key 'no_such_key'", f", in {SMOKE}"]),
        "train_wrong_type": (train + [SMOKE, "--config.batch_size=four"], ["--config.batch_size=four"]),
        "train_invalid_value": (train + [SMOKE, "--config.batch_size=0"],
                                [f"config.batch_size=0: must be an integer >= 1, in {SMOKE}"]),
        "train_missing_workdir": (["experiments.train", "--config", SMOKE], ["--workdir"]),
        "generate_missing_checkpoint": (["experiments.generate", "--checkpoint", missing, "--prompt", "hi"],
                                        [f"{missing}: no such checkpoint directory"]),
        "generate_corrupt_checkpoint": (["experiments.generate", "--checkpoint", corrupt, "--prompt", "hi"],
                                        [os.path.join(corrupt, "config.json"), "not valid JSON"]),
        "convert_missing_hf_dir": (["dsjax.convert", "hf-to-orbax", "--hf_dir", missing, "--out", out], [missing]),
        "convert_corrupt_checkpoint": (["dsjax.convert", "hf-to-orbax", "--hf_dir", corrupt, "--out", out],
                                       [os.path.join(corrupt, "config.json"), "not valid JSON"]),
    }


# Also run with --verbose: an error while absl parses the flags (--verbose read from argv), one in
# main (the parsed flag), and the two argparse CLIs.
VERBOSE = ("train_unknown_key", "train_invalid_value", "generate_corrupt_checkpoint", "convert_corrupt_checkpoint")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's CompletedProcess, keyed by (name, verbose); the processes run concurrently."""
    root = str(tmp_path_factory.mktemp("cli_errors"))
    os.makedirs(os.path.join(root, "corrupt"))
    with open(os.path.join(root, "corrupt", "config.json"), "w") as f:
        f.write('{"model_type": "deepseek_v3", ')
    pythonpath = REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=pythonpath)
    env.pop("XLA_FLAGS", None)
    commands = {(name, False): command for name, (command, _) in _cases(root).items()}
    commands.update({(name, True): _cases(root)[name][0] + ["--verbose"] for name in VERBOSE})

    def run(command):
        return subprocess.run([sys.executable, "-m", *command], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {key: pool.submit(run, command) for key, command in commands.items()}
    return root, {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("name", sorted(_cases("/root")))
def test_bad_input_is_one_error_line_and_status_2(runs, name):
    root, results = runs
    proc = results[name, False]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr
    for fragment in _cases(root)[name][1]:
        assert fragment in lines[-1], lines[-1]
    assert not os.path.exists(os.path.join(root, "out")) and not os.path.exists(os.path.join(root, "workdir"))


@pytest.mark.parametrize("name", VERBOSE)
def test_verbose_prints_the_traceback_with_status_2(runs, name):
    _, results = runs
    proc = results[name, True]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback (most recent call last):" in proc.stderr, proc.stderr
    assert not proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr


# ----------------------------------------------------------------------------- the helper itself


def _raise(error):
    def main():
        raise error
    return main


def test_run_main_returns_the_status_and_reports_bad_input(capsys):
    assert cli.run_main(lambda: None, verbose=False) == 0
    assert cli.run_main(lambda: 3, verbose=False) == 3
    error = ValueError("config.seq_len=1: must be >= 2\n(the second line)")
    assert cli.run_main(_raise(error), verbose=False, where="configs/my_run.py") == cli.EXIT_BAD_INPUT == 2
    want = "error: config.seq_len=1: must be >= 2 (the second line), in configs/my_run.py\n"
    assert capsys.readouterr().err == want
    # --verbose: the traceback instead, same status.
    assert cli.run_main(_raise(error), verbose=True, where="configs/my_run.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "error: " not in err


def test_bugs_propagate_and_expected_failures_exit_1(capsys):
    for bug in (RuntimeError("boom"), TypeError("bad operand"), KeyError("params"), AttributeError("x"),
                OSError(28, "No space left on device")):
        with pytest.raises(type(bug)):
            cli.run_main(_raise(bug), verbose=False)
    assert capsys.readouterr().err == ""

    class Stopped(FloatingPointError):
        pass

    assert cli.run_main(_raise(Stopped("loss is NaN at step 3")), verbose=False, failures=(Stopped,)) == 1
    assert capsys.readouterr().err == "error: loss is NaN at step 3\n"
    # Extra bad-input types are passed in.
    assert cli.run_main(_raise(NotImplementedError("--mesh x: not yet")), verbose=False,
                        errors=cli.BAD_INPUT_ERRORS + (NotImplementedError,)) == 2


def test_what_counts_as_bad_input():
    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("nothing raised")

    def bad_json():
        json.loads("{")

    config = ml_collections.ConfigDict({"learning_rate": 1.0})
    config.lock()
    for error in (CheckpointFormatError("/ckpt/model.safetensors: truncated"), raised(bad_json),
                  FileNotFoundError(2, "No such file or directory", "/x"), PermissionError("/x"),
                  NotADirectoryError("/x"), IsADirectoryError("/x"), FileExistsError("/x already exists"),
                  KeyError("/ckpt: tensor 'w' not found in the checkpoint"),
                  raised(lambda: config["lerning_rate"]), raised(lambda: config.lerning_rate)):
        assert cli.is_bad_input(error), repr(error)
    # A failed lookup with a bare key, or a KeyError/AttributeError outside ml_collections, is a bug.
    assert not cli.is_bad_input(raised(lambda: {}["learning_rate"]))
    assert not cli.is_bad_input(raised(lambda: object().learning_rate))
    assert not cli.is_bad_input(OSError(5, "Input/output error"))
    # ConfigDict's own messages become readable.
    assert cli.error_line(raised(lambda: config.lerning_rate), "c.py") == (
        "error: no such config key 'lerning_rate' "
        "(Did you mean \"learning_rate\" instead of \"lerning_rate\"?), in c.py")
    assert cli.error_line(KeyError("/ckpt: tensor 'w' not found")) == "error: /ckpt: tensor 'w' not found"
    missing = FileNotFoundError(2, "No such file or directory", "/x")
    assert cli.error_line(missing) == "error: /x: no such file or directory"


def test_error_line_names_where_once():
    line = cli.error_line
    assert line(ValueError("bad value"), "configs/a.py") == "error: bad value, in configs/a.py"
    assert line(ValueError("Flag --w must be set."), "a.py") == "error: Flag --w must be set, in a.py"
    # Already named (as given, normalised or absolute), or the message starts with its own path/option.
    assert line(ValueError("/data/x: no such checkpoint directory"), "/data/x/") == (
        "error: /data/x: no such checkpoint directory")
    assert line(ValueError(f"{os.path.abspath('ck')}/config.json: not JSON"), "ck") == (
        f"error: {os.path.abspath('ck')}/config.json: not JSON")
    assert line(ValueError("/out already exists"), "/in") == "error: /out already exists"
    assert line(ValueError("--mesh x=2: not implemented"), "/in") == "error: --mesh x=2: not implemented"
    # A path that merely starts like `where` is another path.
    assert line(ValueError("read 'ckpt2' instead"), "ckpt") == "error: read 'ckpt2' instead, in ckpt"
    # ml_collections embeds a config file's traceback in its error: only the exception is kept.
    embedded = ("flag --config=c.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
                "  File \"c.py\", line 2, in get_config\nValueError: boom\n")
    want = "error: flag --config=c.py: Error whilst parsing config file: ValueError: boom"
    assert line(ValueError(embedded)) == want


def test_argument_parser_errors_are_one_line(capsys):
    from dsjax.convert.__main__ import build_parser  # pylint: disable=import-outside-toplevel
    from experiments.generate import parse_args  # pylint: disable=import-outside-toplevel

    parser = cli.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("sub").add_argument("--x", required=True)
    convert = build_parser().parse_args
    for parse, argv in ((parser.parse_args, ["--n", "two"]), (parser.parse_args, []),
                        (parser.parse_args, ["--n", "1", "sub"]), (parse_args, ["--checkpoint", "ck"]),
                        (convert, ["hf-to-orbax", "--hf_dir", "a", "--out", "b", "--dtype", "int3"]),
                        (convert, ["frob"])):
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_flags_read_from_argv_before_parsing():
    argv = ["prog", "--config", "a.py", "--config=b.py:x", "--verbose", "--", "--config", "c.py"]
    assert cli.flag_value(argv, "config") == "b.py:x"
    assert cli.flag_value(["prog", "-config", "a.py"], "config") == "a.py"
    assert cli.flag_value(["prog", "--configs", "a.py"], "config") is None
    assert cli._bool_flag(argv, "verbose")  # noqa: SLF001
    assert not cli._bool_flag(["--verbose", "--noverbose"], "verbose")  # noqa: SLF001
    assert not cli._bool_flag(["--verbose=false"], "verbose")  # noqa: SLF001
    assert cli._bool_flag(["--verbose=1"], "verbose")  # noqa: SLF001
    assert not cli._bool_flag(["--verbosity=1"], "verbose")  # noqa: SLF001


def test_cli_module_imports_nothing_from_dsjax():
    tree = ast.parse(open(os.path.join(REPO_ROOT, "dsjax", "cli.py")).read())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in modules if m == "dsjax" or m.startswith("dsjax.")], modules
