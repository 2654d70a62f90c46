"""Issue 21 (sections 2 and 5): a bad setting, a damaged offline file or an unsafe lm-eval task
name stops before the model loads, on one line. Most cases call the preflight in-process (the
function `qsim run` calls); two real `qsim run`s prove one line, exit 2, nothing loaded."""
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qsim import data
from qsim.cli import check_output_dir, preflight_overrides
from qsim.config import ConfigError, compose_config
from qsim.environment import ModelLoadError
from qsim.run import preflight

SHARED = Path(os.environ["QSIM_DATA_DIR"])
BAD = (ConfigError, data.DataError)


def refused(*overrides) -> str:
    """preflight's one-line refusal of the config (it never loads weights)."""
    with pytest.raises(BAD) as err:
        preflight(compose_config(list(overrides)))
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- ranges (silently wrong numbers before)

@pytest.mark.parametrize("overrides,message", [
    (["task=humaneval", "task.timeout=-1"], "task.timeout must be a positive number of seconds, got -1.0"),
    (["task=humaneval", "task.timeout=0"], "task.timeout must be a positive"),
    (["task=humaneval", "task.timeout=inf"], "task.timeout must be a positive"),
    (["task=squad", "task.max_new_tokens=-5"], "task.max_new_tokens must be >= 1, got -5"),
    (["task=humaneval", "task.max_samples=-163"], "task.max_samples must be >= 1 or null (all), got -163"),
    (["task=humaneval", "task.max_samples=0"], "task.max_samples must be >= 1 or null (all), got 0"),  # ZeroDivisionError after load
    (["task=lm_eval", "task.tasks=[qsim_sst2]", "task.include_path=/nonexistent"], "task.include_path=/nonexistent is not a folder"),
    (["task.include_path=/tmp"], "task.include_path is read by task=lm_eval only; task=wikitext2 would ignore it"),
    (["task.confirm_run_unsafe_code=true"], "task.confirm_run_unsafe_code is read by task=lm_eval only"),
])
def test_out_of_range_settings_are_refused(overrides, message):
    assert message in refused(*overrides)


def test_valid_limits_still_pass():
    preflight(compose_config(["task=humaneval", "task.max_samples=1", "task.timeout=0.5", "task.max_new_tokens=1"]))


# ---------------------------------------------------------------- damaged offline files, checked whole

def _copy(tmp_path, monkeypatch, rel: str) -> Path:
    """A data dir holding a writable copy of one shared file; QSIM_DATA_DIR points at it."""
    target = tmp_path / "data" / rel
    target.parent.mkdir(parents=True)
    shutil.copyfile(SHARED / rel, target)
    monkeypatch.setenv("QSIM_DATA_DIR", str(tmp_path / "data"))
    return target


WIKITEXT = "wikitext-2-raw-v1/test.jsonl"


def test_corrupt_first_jsonl_line(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, WIKITEXT)
    path.write_text("{not json\n" + path.read_text().split("\n", 1)[1])
    assert "test.jsonl: line 1 is not valid JSON" in refused()


def test_truncated_last_jsonl_line_is_found_before_load(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, WIKITEXT)
    text = path.read_bytes()
    path.write_bytes(text[:-40])  # cut inside the last record
    line = text[:-40].count(b"\n") + 1
    message = refused("task.max_windows=1")
    assert f"test.jsonl: line {line} is not valid JSON" in message and "corrupt or truncated" in message


def test_jsonl_line_without_text_field(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, WIKITEXT)
    path.write_text(path.read_text() + '{"title": "no text"}\n')
    assert "records lack the expected fields (KeyError: 'text')" in refused()


def test_truncated_squad_json(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, "squad-v1.1/dev-v1.1.json")
    path.write_bytes(path.read_bytes()[:100_000])
    assert "dev-v1.1.json: not valid JSON" in refused("task=squad")


def test_squad_json_of_another_shape(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, "squad-v1.1/dev-v1.1.json")
    path.write_text('{"version": "1.1"}')
    assert "records lack the expected fields (KeyError: 'data')" in refused("task=squad")


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"not gzip at all" + b[15:], "not a whole gzip file (Not a gzipped file"),
    (lambda b: b[: len(b) // 2], "not a whole gzip file (Compressed file ended"),
    (lambda b: b[:200] + bytes(x ^ 0xFF for x in b[200:400]) + b[400:], "not a whole gzip file"),
], ids=["not-gzip", "truncated", "flipped-bytes"])
def test_corrupt_humaneval_gzip(tmp_path, monkeypatch, damage, message):
    path = _copy(tmp_path, monkeypatch, "humaneval/HumanEval.jsonl.gz")
    path.write_bytes(damage(path.read_bytes()))
    assert message in refused("task=humaneval")


def test_humaneval_gzip_with_a_bad_record(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, "humaneval/HumanEval.jsonl.gz")
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    path.write_bytes(gzip.compress(("\n".join(lines[:-1] + [lines[-1][:50]]) + "\n").encode()))
    assert f"line {len(lines)} is not valid JSON" in refused("task=humaneval")


def test_whole_file_check_is_cached_by_stat(tmp_path, monkeypatch):
    """A sweep checks every job's data: a file is parsed once per version, again when it changes."""
    path = _copy(tmp_path, monkeypatch, WIKITEXT)
    data.check_available("wikitext2", "test")
    hits = data._parses_whole.cache_info().hits
    data.check_available("wikitext2", "test")
    assert data._parses_whole.cache_info().hits == hits + 1
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(data.DataError, match="is not valid JSON"):
        data.check_available("wikitext2", "test")


# ---------------------------------------------------------------- the output folder

def test_run_dir_that_cannot_be_made(capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight_overrides(["hydra.run.dir=/proc/x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "qsim: error: hydra.run.dir=/proc/x: cannot create a folder in /proc (No such file or directory)"


def test_run_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        check_output_dir("hydra.run.dir", str(tmp_path / "file" / "run"))
    assert "is not a folder" in capsys.readouterr().err


def test_run_dir_probe_leaves_nothing_behind(tmp_path):
    preflight_overrides([f"hydra.run.dir={tmp_path}/a/b"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- lm-eval task names (section 5)

EVIL = """task: evil_task
dataset_path: json
output_type: multiple_choice
doc_to_text: !function evil.doc_to_text
doc_to_target: 0
doc_to_choice: ["a", "b"]
"""


@pytest.fixture
def evil_folder(tmp_path):
    """A task folder whose YAML imports Python that leaves a marker when it runs."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "evil.yaml").write_text(EVIL)
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\ndef doc_to_text(d):\n    return ''\n")
    return folder


def test_unknown_lm_eval_task_is_refused_before_load():
    message = refused("task=lm_eval", "task.tasks=[qsim_sst2,no_such_task]")
    assert message.startswith("unknown lm-eval task 'no_such_task' (not in qsim's offline tasks (qsim_sst2), lm-eval ")


def test_lm_eval_registry_and_offline_names_resolve():
    preflight(compose_config(["task=lm_eval", "task.tasks=[qsim_sst2,arc_easy]"]))


@pytest.mark.parametrize("name", ["/x/evil.yaml", "tasks/evil.yaml", "evil.yaml", "~/evil.yml"])
def test_path_task_names_need_an_include_path(name):
    message = refused("task=lm_eval", f"task.tasks=['{name}']")
    assert "is a path; lm-eval task files are code" in message and "task.include_path" in message


def test_path_task_name_inside_the_include_path_is_accepted_without_running_it(evil_folder, tmp_path):
    preflight(compose_config(["task=lm_eval", f"task.tasks=[{evil_folder}/evil.yaml]", f"task.include_path={evil_folder}"]))
    preflight(compose_config(["task=lm_eval", "task.tasks=[evil_task]", f"task.include_path={evil_folder}"]))
    assert not (tmp_path / "ran").exists()  # names resolve by parsing only


def test_path_task_name_outside_the_include_path(evil_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    message = refused("task=lm_eval", f"task.tasks=[{evil_folder}/evil.yaml]", f"task.include_path={other}")
    assert "is outside task.include_path" in message
    message = refused("task=lm_eval", f"task.tasks=[{evil_folder}/missing.yaml]", f"task.include_path={evil_folder}")
    assert "is not a file naming an lm-eval task" in message


def test_unsafe_code_is_off_unless_set_and_then_recorded():
    from omegaconf import OmegaConf

    from qsim.results import config_changes, identity

    def resolved(*extra):
        return OmegaConf.to_container(compose_config(["task=lm_eval", "task.tasks=[qsim_sst2]", *extra]), resolve=True)

    default, unsafe = resolved(), resolved("task.confirm_run_unsafe_code=true")
    assert default["task"]["confirm_run_unsafe_code"] is False
    assert config_changes(unsafe)["task"]["confirm_run_unsafe_code"] is True
    assert identity(unsafe, {}) != identity(default, {})
    older = {**default, "task": {k: v for k, v in default["task"].items() if k != "confirm_run_unsafe_code"}}
    assert identity(older, {}) == identity(default, {})  # results made before the key keep their identity


# ---------------------------------------------------------------- a model folder without tokenizer files

@pytest.fixture(scope="module")
def no_tokenizer_folder(tmp_path_factory):
    import transformers

    from qsim.models import tiny_opt_config

    folder = tmp_path_factory.mktemp("opt-no-tokenizer")
    transformers.OPTForCausalLM(tiny_opt_config()).save_pretrained(folder)
    return folder


def test_tokenizer_without_files_is_refused(no_tokenizer_folder):
    message = refused("model=opt-125m", f"model.hf_id={no_tokenizer_folder}", "task.seq_len=128")
    assert f"the tokenizer of '{no_tokenizer_folder}' has 1 token(s): its tokenizer files are missing" in message


def test_tokenizer_that_cannot_be_built_is_refused_at_load(tmp_path):
    import torch
    import transformers

    from qsim.models import load_hub, tiny_config

    transformers.LlamaForCausalLM(tiny_config("llama", "causal-lm", 64)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load the tokenizer of .*its tokenizer files are missing"):
        load_hub(str(tmp_path), torch.float32)


# ---------------------------------------------------------------- the real command: one line, exit 2, no load

def _qsim_run(*args, env=None):
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qsim.cli", "run", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def _one_line_before_load(proc, must: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("qsim: error: ")
    assert must in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert "load" not in proc.stdout


def test_cli_truncated_last_line_stops_before_load(tmp_path, monkeypatch):
    path = _copy(tmp_path, monkeypatch, WIKITEXT)
    path.write_bytes(path.read_bytes()[:-40])
    _one_line_before_load(_qsim_run("task.max_windows=1", env={"QSIM_DATA_DIR": str(tmp_path / "data")}),
                          "is not valid JSON")


def test_cli_tokenizer_without_files_stops_before_load(no_tokenizer_folder):
    _one_line_before_load(_qsim_run("model=opt-125m", f"model.hf_id={no_tokenizer_folder}", "task.seq_len=128"),
                          "has 1 token(s)")
