"""lm-evaluation-harness: the ``langneurons`` model type and ``langneurons eval`` on a local task
(YAML + local JSONL data) and the tiny model, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ci import require_module
import torch

lm_eval = require_module("lm_eval")

from langneurons.intervene import deactivate  # noqa: E402
from test_export import planted_map  # noqa: E402
from tiny import save_tiny  # noqa: E402

ROWS = [{"question": "The cat sat on the", "choices": ["mat.", "market.", "rain."], "answer": 0},
        {"question": "Wie viele Äpfel", "choices": ["sind übrig?", "Katze.", "Stadt."], "answer": 0},
        {"question": "猫坐在", "choices": ["温暖的垫子上。", "市场。"], "answer": 1},
        {"question": "It rained all day in the", "choices": ["city.", "Katze.", "垫子"], "answer": 0}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    import datasets

    root = tmp_path_factory.mktemp("lmeval")
    datasets.config.HF_DATASETS_CACHE = root / "ds-cache"  # module-scoped: keep the user's cache clean
    model_dir = save_tiny(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: ln_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n", encoding="utf-8")
    (tasks / "gen.yaml").write_text(
        f"task: ln_tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{choices[answer]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n",
        encoding="utf-8")
    run = root / "run"
    run.mkdir()
    nmap = planted_map(2, 48, langs=("en", "de", "zh"), seed=1)
    nmap.meta["hook_point"] = "model.layers.{i}.mlp.act_fn"
    nmap.save(run / "neurons.safetensors")
    (run / "manifest.json").write_text(json.dumps({"model": {"model": str(model_dir), "dtype": "float32"}}))
    from lm_eval.tasks import TaskManager

    return {"model": model_dir, "tasks": tasks, "run": run, "nmap": nmap,
            "tm": TaskManager(include_path=str(tasks), include_defaults=False)}


def _evaluate(model, setup, model_args=None):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["ln_tiny_mc", "ln_tiny_gen"],
                                   task_manager=setup["tm"], batch_size=2, log_samples=True,
                                   bootstrap_iters=0)


def _resps(out, task):
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_empty_intervention_equals_lm_evals_hf_model(setup) -> None:
    import langneurons.lm_eval_model  # noqa: F401 - registers the model type

    args = f"pretrained={setup['model']},device=cpu"
    hf = _evaluate("hf", setup, args)
    ours = _evaluate("langneurons", setup, args)
    for task in ("ln_tiny_mc", "ln_tiny_gen"):
        assert _resps(ours, task) == _resps(hf, task)  # every log-likelihood and generation, exactly
        assert ours["results"][task] == hf["results"][task]


def test_deactivation_equals_hf_model_with_the_hook(setup) -> None:
    from lm_eval.models.huggingface import HFLM

    from langneurons.lm_eval_model import LangNeuronsLM

    mask = setup["nmap"].language_mask("de", ("specific", "related"))
    assert mask.any()
    ours = _evaluate(LangNeuronsLM(pretrained=str(setup["model"]), device="cpu", batch_size=2,
                                   neurons=str(setup["run"]), deactivate="de", classes="specific+related"), setup)
    hf = HFLM(pretrained=str(setup["model"]), device="cpu", batch_size=2)
    plain = _evaluate(hf, setup)
    with deactivate(hf.model, mask):  # the second code path: lm-eval's own model under our hook
        hooked = _evaluate(hf, setup)
    assert _resps(ours, "ln_tiny_mc") == _resps(hooked, "ln_tiny_mc")
    assert _resps(ours, "ln_tiny_gen") == _resps(hooked, "ln_tiny_gen")
    assert _resps(ours, "ln_tiny_mc") != _resps(plain, "ln_tiny_mc")  # the intervention is not a no-op


def test_bad_model_args_are_one_line(setup) -> None:
    from langneurons.errors import LangNeuronsError
    from langneurons.lm_eval_model import build_intervention

    with pytest.raises(LangNeuronsError, match="needs neurons="):
        build_intervention(None, "de")
    with pytest.raises(LangNeuronsError, match="not in the neuron map"):
        build_intervention(setup["run"], "fr")
    with pytest.raises(LangNeuronsError, match="set_lang"):
        build_intervention(setup["run"], "de", mode="set")
    assert build_intervention(setup["run"], None).empty


@pytest.mark.slow  # lm-eval's command line indexes all its built-in tasks (~25 s on 2 cores)
def test_lm_eval_command_line_knows_the_model_type(setup, capsys) -> None:
    from langneurons.lm_eval_model import main

    main(["run", "--model", "langneurons", "--model_args",
          f"pretrained={setup['model']},neurons={setup['run']},deactivate=de,classes=specific+related",
          "--tasks", "ln_tiny_mc", "--include_path", str(setup["tasks"]), "--device", "cpu", "--batch_size", "2"])
    out = capsys.readouterr().out
    assert "ln_tiny_mc" in out and "acc" in out and "langneurons" in out


def test_eval_stage_writes_results_and_samples(setup, capsys) -> None:
    from langneurons.cli import main
    from langneurons.report.evalharness import _section_eval

    run = setup["run"]
    argv = ["eval", str(run), "--tasks", "ln_tiny_mc", "--include-path", str(setup["tasks"]), "--deactivate",
            "de", "--classes", "specific;specific,related", "--batch-size", "2", "--device", "cpu"]
    main(argv)
    result = json.loads((run / "eval" / "results.json").read_text())
    labels = [c["label"] for c in result["cells"]]
    assert labels == ["none", "zero:de:specific", "zero:de:specific+related"]
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['model']},device=cpu",
                                 tasks=["ln_tiny_mc"], task_manager=setup["tm"], batch_size=2, bootstrap_iters=1000)
    assert result["results"]["none"]["ln_tiny_mc"]["acc,none"] == hf["results"]["ln_tiny_mc"]["acc,none"]
    samples = (run / "eval" / "samples" / "zero_de_specific+related" / "ln_tiny_mc.jsonl").read_text().splitlines()
    assert len(samples) == len(ROWS)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["result"]["cells"] == labels
    capsys.readouterr()
    main(argv)
    assert "up to date" in capsys.readouterr().out
    html = _section_eval(run)
    assert html is not None and "zero:de:specific" in html
