"""`langneurons generate RUN --task PATH`: the model answers a task's questions in every language."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import split_list
from .app import app


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="Run directory (re-running resumes per language)."),
    task: Path = typer.Option(..., help="Questions: mgsm_<lang>.tsv files, MSVAMP test_<lang>.json, JSONL "
                              "{lang, id, question, answer}, or a directory of them."),
    model: Optional[str] = typer.Option(None, help="Model (default: the run's model)."),
    langs: Optional[str] = typer.Option(None, help="Comma list of languages (default: all in the task)."),
    max_questions: Optional[int] = typer.Option(None, help="Answer only the first N questions per language."),
    max_new_tokens: int = typer.Option(256, help="Tokens per answer at most (then it stops by length)."),
    batch_size: int = typer.Option(8, help="Questions decoded together (KV cache, left padding)."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling (with --sample; 1: off)."),
    top_k: int = typer.Option(0, help="Top-k sampling (with --sample; 0: off)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Use the tokenizer's chat template "
                                        "(default: when it has one)."),
    template: Optional[str] = typer.Option(None, help="User message with {question} (default: the question for "
                                           "chat models, 'Question: {question}\\nAnswer:' otherwise)."),
    counting: str = typer.Option("pass", help="pass: count the response tokens in one pass over the generated "
                                 "ids; during: count them while generating (no extra pass)."),
    record: bool = typer.Option(True, help="Also record the answers' response tokens into RUN/stats."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: the run's, else float32)."),
    device: Optional[str] = typer.Option(None),
    device_map: Optional[str] = typer.Option(None, help="e.g. auto, to spread a large model over GPUs."),
    mlp_act_path: Optional[str] = typer.Option(None, help="Override: path of the activation module, with {i}."),
    progress: bool = typer.Option(True, help="Show progress bars (with tokens/s)."),
    force: bool = typer.Option(False, help="Generate (and record) every language again."),
) -> None:
    """Answer every question in every language: RUN/responses/<lang>.jsonl (and, with --record,
    the response-token counts in RUN/stats)."""
    from ..config import ModelConfig
    from ..generate import GenerateStage, GenerateStageConfig, group_questions, record_responses
    from ..lm import GenerateConfig
    from ..record import RecordConfig
    from ..runs import RunDir
    from ..tasks import read_task

    lang_list = split_list(langs, what="--langs")
    cfg = GenerateStageConfig(task=task, langs=lang_list, max_questions=max_questions, template=template,
                              counting=counting, progress=progress,
                              decoding=GenerateConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                                      batch_size=batch_size, chat=chat)).validate()
    rec_cfg = RecordConfig(scope="response", batch_size=batch_size, act_path=mlp_act_path).validate()
    questions = group_questions(read_task(task, langs=lang_list))
    run = RunDir(run_dir)
    if model is None:  # the run's model: from its manifest, or from an earlier generate stage
        model = run.stage_result("generate").get("model") if not run.read_manifest().get("model") else None
    loaded = ModelConfig(model=model, dtype=dtype, device=device, device_map=device_map,
                         act_path=mlp_act_path).validate().load(run.read_manifest())
    stage = GenerateStage(run, loaded, questions, cfg, record_config=rec_cfg, by="generate")
    responses = stage.run_stage(force=force, echo=typer.echo)
    typer.echo(f"wrote {run.path / 'responses'} ({', '.join(f'{k} {len(v)}' for k, v in responses.items())} answers)")
    if record:
        stats = record_responses(run, loaded, list(responses), rec_cfg, counting=counting, force=force,
                                 progress=progress, by="generate")
        for lang, n in zip(stats.languages, stats.tokens.tolist()):
            typer.echo(f"{lang:>8}  {n:>10,} response tokens")
        typer.echo(f"wrote {run.path / 'stats'} ({stats.num_layers} layers x {stats.num_neurons} neurons, "
                   f"counted {'during generation' if counting == 'during' else 'in one pass over the generated ids'})")
