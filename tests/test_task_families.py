"""Table X's tasks and model families: SST-2, SQuAD (extractive and generative), HumanEval and
ImageNet, on the offline SmolLM2 and tiny random models of the paper's other architectures."""
import json
import os

import pytest
import torch

from qsim.tasks import greedy_generate
from qsim.tasks.humaneval import pass_at_k, problems, program, run_program
from qsim.tasks.squad import exact_match, f1_score, normalize_answer, squad_scores
from test_tasks import qsim_run


# --- metrics against their official definitions' worked examples

def test_squad_normalization_is_the_official_one():
    # lower case, punctuation dropped (the apostrophe too), articles a/an/the dropped, spaces collapsed
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("Levi's Stadium, an arena") == "levis stadium arena"
    assert normalize_answer("Theater") == "theater"  # "the" only as a word


def test_squad_f1_and_em_by_hand():
    # prediction tokens: levis stadium in santa clara (5); truth: levis stadium (2); 2 in common
    assert f1_score("Levi's Stadium in Santa Clara", "Levi's Stadium") == pytest.approx(2 * 0.4 * 1.0 / 1.4, abs=1e-15)
    assert f1_score("the Denver Broncos", "Denver Broncos.") == 1.0 and exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
    assert f1_score("Carolina", "Denver Broncos") == 0.0 and f1_score("", "gold") == 0.0
    # repeated tokens count as a multiset: pred "a b b" vs truth "b b c": 2 common, P = R = 2/3
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3, abs=1e-15)
    # the best reference counts; averaged over questions, in percent
    scores = squad_scores(["Denver Broncos", "gold medal"], [["Broncos", "Denver Broncos"], ["gold"]])
    assert scores == {"f1": pytest.approx(100 * (1.0 + 2 / 3) / 2, abs=1e-12), "exact_match": 50.0}


def test_pass_at_k_is_the_unbiased_estimator():
    # 1 - C(n-c, k) / C(n, k)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10, abs=1e-15)
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - _comb_ratio(200, 13, 10), abs=1e-12)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer failures than draws


def _comb_ratio(n, c, k):
    from math import comb

    return comb(n - c, k) / comb(n, k)


# --- HumanEval's sandbox

def test_humaneval_reference_solutions_pass_and_wrong_code_fails():
    chosen, available = problems("test", 12)
    assert available == 164
    assert all(run_program(program(p, p["canonical_solution"]), 10)[0] for p in chosen)
    assert run_program(program(chosen[0], "    return True\n"), 10) == (False, "AssertionError")
    assert run_program(program(chosen[0], "    return undefined_name\n"), 10) == (False, "NameError: name 'undefined_name' is not defined")


def test_humaneval_sandbox_stops_loops_and_keeps_files_out_of_cwd(tmp_path):
    p = problems("test", 1)[0][0]
    assert run_program(program(p, "    while True:\n        pass\n"), 1.0) == (False, "timeout")
    before = set(os.listdir(os.getcwd()))
    run_program("open('stray.txt', 'w').write('x')\nimport os\nassert os.environ.get('HOME') is None\n", 5)
    assert set(os.listdir(os.getcwd())) == before


# --- generation through the KV cache stays causal

@pytest.mark.parametrize("arch", ["llama", "codegen"])
def test_greedy_generation_with_the_cache_equals_full_recompute(arch):
    """Quantized attention (W4A8 ABFP, attention operands on): decoding one token at a time
    through the cache gives the tokens a full forward over the whole sequence picks."""
    from qsim.config import compose_config
    from qsim.models import load_tiny
    from qsim.run import build_plan
    from qsim.surgery import quantize_model

    lm = load_tiny(arch, "causal-lm" if arch == "llama" else "code-lm", torch.float32)
    report = quantize_model(lm.model, build_plan(compose_config(["format=w4a8", "method=abfp"])))
    assert len(report.attention_sites) == 2
    prompt = "def add(a, b):\n    return"
    text, n_prompt, n_new = greedy_generate(lm.model, lm.tokenizer, prompt, 12)
    ids = lm.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n_new):
            ids.append(int(lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert n_new == 12 and lm.tokenizer.decode(ids[n_prompt:], skip_special_tokens=True) == text


# --- the tasks end to end (qsim run, offline)

def _result(tmp_path):
    return json.loads((tmp_path / "result.json").read_text())


def test_sst2_zero_shot_on_smollm2(tmp_path):
    run = qsim_run(tmp_path, "task=sst2", "task.max_samples=24", "format=w4a8", "method=abfp")
    assert run.returncode == 0, run.stderr[-2000:]
    r = _result(tmp_path)
    assert (r["metric"], r["higher_is_better"], r["model_family"]) == ("accuracy", True, "causal-lm")
    assert (r["eval"]["correct"], r["eval"]["samples"], r["eval"]["samples_available"]) == (SST2_CORRECT, 24, 872)
    assert r["data"]["eval"][0]["file"] == "glue/sst2/dev.tsv" and r["quantized"]["attention_sites"] == 30


def test_squad_generative_on_smollm2(tmp_path):
    run = qsim_run(tmp_path, "task=squad", "task.max_samples=4", "format=w4a8", "method=abfp")
    assert run.returncode == 0, run.stderr[-2000:]
    r = _result(tmp_path)
    assert (r["metric"], r["eval"]["mode"], r["eval"]["samples_available"]) == ("f1", "generative (greedy, KV cache)", 10570)
    assert r["value"] == pytest.approx(SQUAD_GEN_F1, abs=1e-9) and r["eval"]["exact_match"] == pytest.approx(SQUAD_GEN_EM, abs=1e-9)
    assert r["quantized"]["attention_calls"] > 4 * 30  # prefill and every decode step went through qsim's attention


SST2_CORRECT = 14  # of the first 24 (FP32 gets 112 of the first 200: SmolLM2-135M is a weak zero-shot classifier)
SQUAD_GEN_F1, SQUAD_GEN_EM = 36.30952380952381, 0.0  # the instruct model answers in sentences
FAMILY_VALUES = {"tiny-bert-qa": 19.861111111111114, "tiny-llama": 1 / 6}
VIT_TOP1 = 0.0
LM_EVAL_SST2_ACC = SST2_CORRECT / 24  # lm-eval's qsim_sst2 counts what qsim's sst2 counts

FAMILY_RUNS = {  # model -> (task args, metric, value, layers, attention sites)
    "tiny-bert-qa": (["task=squad", "task.max_samples=6"], "f1", None, 13, 2),
    "tiny-llama": (["task=sst2", "task.max_samples=6", "model.family=seq-classifier"], "accuracy", None, 15, 2),
    "tiny-codegen": (["task=humaneval", "task.max_samples=2", "task.max_new_tokens=24"], "pass@1", 0.0, 8, 2),
}


@pytest.mark.parametrize("model", list(FAMILY_RUNS))
def test_tiny_family_runs_end_to_end(model, tmp_path):
    args, metric, value, layers, sites = FAMILY_RUNS[model]
    run = qsim_run(tmp_path, f"model={model}", *args, "format=w4a8", "method=abfp")
    assert run.returncode == 0, run.stderr[-2000:]
    r = _result(tmp_path)
    assert r["metric"] == metric and r["quantized"]["layers"] == layers and r["quantized"]["attention_sites"] == sites
    assert r["quantized"]["attention_calls"] > 0
    assert r["value"] == pytest.approx(FAMILY_VALUES[model] if value is None else value, abs=1e-9)
    if model == "tiny-codegen":  # generated code ran isolated, and result.json says how
        assert r["eval"]["sandbox"]["isolated"] is True and "net" in r["eval"]["sandbox"]["namespaces"]


def generated_imagenet(root, splits=("val",)):
    """Image folders of 3 classes x 2 random images per split (a pipeline check, not a number)."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in splits:
        for label in range(3):
            folder = root / "imagenet" / split / f"n0000000{label}"
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return {**os.environ, "QSIM_DATA_DIR": str(root)}


def test_imagenet_pipeline_on_generated_images_with_tiny_vit(tmp_path):
    env = generated_imagenet(tmp_path / "data")
    run = qsim_run(tmp_path / "run", "model=tiny-vit", "task=imagenet", "format=w4a8", "method=abfp", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    r = _result(tmp_path / "run")
    assert (r["metric"], r["eval"]["samples"], r["model_family"]) == ("top1", 6, "image-classifier")
    assert r["quantized"]["attention_sites"] == 2 and r["data"]["eval"][0]["source"] == "offline"
    assert r["value"] == pytest.approx(VIT_TOP1, abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["model=minilm", "task=squad"], "task=squad scores qa-encoder or causal-lm or code-lm models; model 'minilm' is a sentence-encoder"),
    (["model=tiny-vit", "task=imagenet", "method=gptq"], "method step 'gptq' calibrates on token windows; an image classifier calibrates with mse or smoothquant"),
    (["model=tiny-vit", "task=imagenet", "method=mse"], "an image classifier calibrates on images: set calib.dataset=task"),
    (["model=tiny-bert-qa", "model.family=code-lm"], "model.arch=bert has no code-lm"),
    (["model=tiny-vit", "task=imagenet"], "has no imagenet/val"),  # data checked before the model loads
])
def test_family_mismatches_are_one_line_errors(args, message, tmp_path):
    run = qsim_run(tmp_path, *args)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_lm_eval_bridge_scores_the_simulated_model_in_memory_offline(tmp_path):
    """lm-eval's HFLM on the quantized model object; its qsim_sst2 (offline SST-2 dev) asks what
    qsim's own sst2 task asks, so both count the same correct answers."""
    run = qsim_run(tmp_path / "lm", "task=lm_eval", "task.tasks=[qsim_sst2]", "task.max_samples=24", "format=w4a8", "method=abfp")
    assert run.returncode == 0, run.stderr[-2000:]
    r = _result(tmp_path / "lm")
    assert r["eval"]["value_metric"] == "qsim_sst2/acc,none" and r["eval"]["samples"] == 24
    assert set(r["eval"]["lm_eval"]["qsim_sst2"]) >= {"acc,none"} and r["quantized"]["attention_calls"] > 0
    assert r["data"]["eval"][0]["file"] == "glue/sst2/dev.tsv"
    assert r["eval"]["confirm_run_unsafe_code"] is False  # lm-eval's unsafe tasks stay refused unless the key is set
    # the same count as qsim's own sst2 on these 24 (test_sst2_zero_shot_on_smollm2 pins it)
    assert r["value"] == pytest.approx(LM_EVAL_SST2_ACC, abs=1e-12)


def test_lm_eval_without_tasks_is_a_one_line_error(tmp_path):
    run = qsim_run(tmp_path, "task=lm_eval")
    assert run.returncode == 2 and "task.tasks=[...]" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


# --- a task's own calibration text (calib.dataset=task)

def _windows(smollm2, *overrides):
    from qsim.config import compose_config
    from qsim.tasks import calibration_windows

    cfg = compose_config(["calib.dataset=task", "calib.n_samples=2", "calib.seq_len=64", *overrides])
    return [smollm2.tokenizer.decode(w) for w in calibration_windows(smollm2.tokenizer, cfg)]


def test_sst2_calibrates_on_its_training_sentences_as_the_task_prompts_them(smollm2):
    first, second = _windows(smollm2, "task=sst2")
    assert "\nQuestion: Is this sentence positive or negative?\nAnswer:" in first + second
    # the same seeded starts as a corpus: SST-2 train's plain sentences are another text
    plain = _windows(smollm2, "task=sst2", "calib.dataset=sst2", "calib.split=train")
    assert plain != [first, second] and "Question:" not in "".join(plain)


def test_squad_and_stsb_calibration_texts_come_from_their_training_splits(smollm2, tmp_path, monkeypatch):
    # offline there is no SQuAD or STS-B train: a folder holding their dev files under the train names
    data_dir = os.environ["QSIM_DATA_DIR"]
    (tmp_path / "squad-v1.1").mkdir()
    (tmp_path / "squad-v1.1" / "train-v1.1.json").symlink_to(f"{data_dir}/squad-v1.1/dev-v1.1.json")
    (tmp_path / "glue" / "stsb").mkdir(parents=True)
    (tmp_path / "glue" / "stsb" / "train.tsv").symlink_to(f"{data_dir}/glue/stsb/dev.tsv")
    monkeypatch.setenv("QSIM_DATA_DIR", str(tmp_path))
    squad = "".join(_windows(smollm2, "task=squad"))
    assert "\n\nQuestion: " in squad and "Background: " in squad
    from qsim.tasks.stsb import calibration_texts, pairs

    rows = pairs("train", None)[0]
    assert calibration_texts("stsb", "train")[:4] == [rows[0][0], rows[0][1], rows[1][0], rows[1][1]]


@pytest.mark.parametrize("overrides, message", [
    (["task=humaneval"], "task 'humaneval' has no calibration split of its own"),
    (["task=squad"], "squad-v1.1/train-v1.1.json"),  # online, the hub's train split
    (["task=sst2", "task.split=train"], "would calibrate on sst2 train, the split task 'sst2' evaluates"),
    (["task=sst2", "calib.split=train"], "calib.split=train names a corpus split; with calib.dataset=task the task's own is read (sst2 train)"),
    (["model=minilm", "task=stsb"], "glue/stsb/train.tsv"),
], ids=["humaneval", "squad-offline", "own-eval-split", "split-ignored", "stsb-offline"])
def test_task_calibration_errors_stop_before_loading(overrides, message, tmp_path):
    run = qsim_run(tmp_path, *overrides, "method=smoothquant", "calib.dataset=task")
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1


def test_sst2_run_calibrated_on_the_task_records_its_calibration_data(tmp_path):
    run = qsim_run(tmp_path, "task=sst2", "task.max_samples=24", "format=w4a8", "method=smoothquant",
                   "calib.dataset=task", "calib.n_samples=4", "calib.seq_len=128")
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["data"]["calib"][0]["file"] == "glue/sst2/train.tsv" and r["data"]["eval"][0]["file"] == "glue/sst2/dev.tsv"
    assert r["config"]["calib"]["dataset"] == "task"
    assert r["methods"]["smoothquant"]["calib_windows"] == 4 and r["eval"]["correct"] == 13  # of 24


# 13 linears and 2 attention sites x 4 operands; the amax median depends on the images drawn
@pytest.mark.parametrize("method, facts", [("mse", {"calibrated": 21, "attention_calibrated": 8, "dynamic_fallback": []}),
                                           ("smoothquant", {"folded_into_norm": 8})])  # q, k, v, intermediate x 2 layers
def test_tiny_vit_calibrates_on_its_task_training_images(method, facts, tmp_path):
    env = generated_imagenet(tmp_path / "data", splits=("train", "val"))
    run = qsim_run(tmp_path / "run", "model=tiny-vit", "task=imagenet", "format=w4a8", f"method={method}",
                   "calib.dataset=task", "calib.n_samples=4", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    r = _result(tmp_path / "run")
    assert r["data"]["calib"][0]["file"] == "imagenet/train" and r["data"]["eval"][0]["file"] == "imagenet/val"
    stage = r["methods"][method]
    assert stage["calib_images"] == 4 and stage["calib_image_size"] == [32, 32] and "calib_tokens" not in stage
    assert {k: stage[k] for k in facts} == facts
    if method == "mse":
        assert stage["amax"]["median"] == pytest.approx(0.6321840882301331, rel=1e-6)
