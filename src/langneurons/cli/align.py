"""`langneurons align`: MAPO-style multilingual preference alignment (sample, score, pair, DPO+LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from .app import app, split_list


@app.command("align")
def align_command(
    model: str = typer.Option(..., help="Alias (gemma-3-270m, smollm2-135m), local HF directory or .gguf."),
    out: Path = typer.Option(..., help="Output directory (re-running resumes; the aligned model is OUT/merged)."),
    questions: Optional[Path] = typer.Option(
        None, help="Parallel questions: JSONL {id, lang, question, answer}, mgsm_<lang>.tsv files, MSVAMP-style "
                   "JSON, or a directory of them (default: the shipped 30 problems x 10 languages)."),
    pivot: str = typer.Option("en", help="Pivot language whose (greedy) answers are the reference."),
    langs: Optional[str] = typer.Option(None, help="Comma list of languages to align (default: every non-pivot "
                                                   "language of the questions). Align a few, watch the others."),
    n_samples: int = typer.Option(4, help="Sampled answers per question and language."),
    max_new_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.95),
    seed: int = typer.Option(0),
    max_questions: Optional[int] = typer.Option(None, help="Use only the first N question ids."),
    gen_batch_size: int = typer.Option(8, help="Prompts per generate call (each with --n-samples sequences)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat",
                                        help="Use the tokenizer's chat template (default: when it has one)."),
    prompt_template: Optional[str] = typer.Option(
        None, help="Prompt with a {question} slot (default: '{question}' with chat, 'Q: {question}\\nA:' without)."),
    scorer: str = typer.Option("self", help="'self' (the model translates), a registered scorer, or the path of "
                                            "a local NLLB / M2M-100 / mBART-50 / Marian model."),
    score_batch_size: int = typer.Option(8),
    min_margin: float = typer.Option(0.0, help="Minimum score margin (mean log-prob per pivot token) of a pair."),
    lr: float = typer.Option(1e-6, help="Learning rate (paper: 1e-6; LoRA on a small model may need 1e-5..1e-4)."),
    beta: float = typer.Option(0.1, help="DPO beta."),
    lora_r: int = typer.Option(64),
    lora_alpha: int = typer.Option(128),
    lora_dropout: float = typer.Option(0.05),
    lora_targets: Optional[str] = typer.Option(None, help="Comma list of module names (default: the family's "
                                                          "attention and MLP projections)."),
    epochs: float = typer.Option(1.0),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(4, help="Pairs per optimizer step (per device, before accumulation)."),
    grad_accum: int = typer.Option(1),
    max_length: int = typer.Option(1024, help="Longest prompt + answer in training, in tokens."),
    save_every: int = typer.Option(100, help="Checkpoint every N optimizer steps (and at the end)."),
    merge_checkpoints: bool = typer.Option(True, "--merge-checkpoints/--no-merge-checkpoints",
                                           help="Also save every checkpoint as a full model (OUT/checkpoints/step-N)."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for memory in training."),
    dtype: str = typer.Option("float32"),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Align a model across languages (MAPO): its answers in --langs are trained, by DPO with a LoRA
    adapter, to agree with its own pivot-language answers."""
    from ..align import AlignConfig, align, check_scorer
    from ..models import load_model

    cfg = AlignConfig(
        pivot=pivot, langs=split_list(langs), n_samples=n_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, gen_batch_size=gen_batch_size, max_questions=max_questions,
        chat=chat, prompt_template=prompt_template.replace("\\n", "\n") if prompt_template else None,
        scorer=scorer, score_batch_size=score_batch_size, min_margin=min_margin, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=split_list(lora_targets), lr=lr,
        beta=beta, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        max_length=max_length, save_every=save_every, merge_checkpoints=merge_checkpoints,
        gradient_checkpointing=gradient_checkpointing)
    cfg.validate()  # before the (slow) model load
    check_scorer(scorer)
    if questions is not None and not questions.exists():
        raise LangNeuronsError(f"question file {questions} does not exist; give a .jsonl/.json file, "
                               "mgsm_<lang>.tsv files or a directory of them")
    loaded = load_model(model, dtype=dtype, device=device)
    result = align(cfg, loaded, questions, out, progress=True)
    c = result.manifest.get("counts", {})
    done = f" (reused: {', '.join(result.skipped)})" if result.skipped else ""
    typer.echo(f"aligned {loaded.source} on {', '.join(result.trained_langs)} (pivot {pivot}){done}")
    typer.echo(f"  {c.get('questions')} questions, {sum(c.get('samples', {}).values())} samples, "
               f"{sum(c.get('pairs', {}).values())} pairs ({', '.join(f'{k} {v}' for k, v in c.get('pairs', {}).items())})")
    typer.echo(f"  merged model: {result.merged_dir}")
    for ckpt in result.checkpoints:
        typer.echo(f"  checkpoint:   {ckpt}")
    typer.echo(f"next: langneurons run --model {result.merged_dir} --out runs/aligned, then "
               f"langneurons compare runs/base runs/aligned --out runs/compare")
