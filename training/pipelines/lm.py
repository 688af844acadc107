"""The ``lm`` trainer's pipeline: a GPT-2-style model trained on a text corpus.

split (sharder)            the corpus's files dealt into shards, a validation part held
                           out, and the tokeniser trained on the training part
tokenise (work queue)      one queue item per shard, tokenised in parallel by the job's
                           queue workers
merge (merger)             the shards' tokens joined, in shard order, into one array
train (coordinated batch)  W data-parallel workers (``training.coordinated``)
evaluate (filter)          validation perplexity above ``eval.max_perplexity`` fails the job
register (sink)            the model and its tokeniser become a version in the store
promote (sink)             with ``promote: true``, the ``serving`` alias moves to it

The ``lm`` record in ``training.trainers.registry`` names ``stages``, the queue handler
``lm.tokenise`` (``tokenise_item``) and ``job_metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from training.program import ProgramSpec
from training.queue_workers import QueueItem, run_queue_stage
from training.registration import job_source, promote, register_once
from training.stages import Stage, StageContext, StageRejected
from training.trainers import lm
from training.trainers.lm_spec import LmJobSpec

VAL_SHARD = "val"


def stages() -> list[Stage[LmJobSpec]]:
    return [
        Stage("split", "sharder", 0.04, split_corpus),
        Stage("tokenise", "work queue", 0.08, tokenise_shards),
        Stage("merge", "merger", 0.02, merge_shards),
        Stage("train", "coordinated batch", 0.80, train),
        Stage("evaluate", "filter", 0.01, evaluate),
        Stage("register", "sink", 0.04, register),
        Stage("promote", "sink", 0.01, promote_version),
    ]


def _vocab_size(context: StageContext[LmJobSpec]) -> int:
    hp = context.spec.hyperparameters
    return hp.vocab_size or lm.lm_preset(hp.preset).vocab_size


def split_corpus(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    spec = context.spec
    hp = spec.hyperparameters
    files = lm.corpus_files(spec.dataset, max_bytes=int(hp.max_corpus_mb * 1_000_000))
    plan = lm.plan_split(files, shards=hp.shards, seed=hp.seed)
    ws = context.workspace
    ws.split_file.parent.mkdir(parents=True, exist_ok=True)
    ws.split_file.write_text(plan.to_json())
    train_files = [Path(f) for shard in plan.train_shards for f in shard]
    context.log(
        f"split: {len(files)} files into {len(plan.train_shards)} shards, "
        f"{len(plan.val_files)} held out; training the tokeniser"
    )
    context.check_stop()
    lm.train_tokenizer(train_files, vocab_size=_vocab_size(context), out_dir=ws.tokenizer_dir)
    # what the tokeniser reached: a small corpus stops short of the asked-for size
    vocab = lm.tokenizer_vocab_size(ws.tokenizer_dir)
    return {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "shards": len(plan.train_shards),
        "val_files": len(plan.val_files),
        "vocab_size": vocab,
    }


def tokenise_item(payload: dict[str, Any]) -> dict[str, Any]:
    """Queue handler ``lm.tokenise``: one shard's files -> one token file."""
    tokens = lm.tokenise_files(
        [Path(f) for f in payload["files"]],
        tokenizer_dir=Path(payload["tokenizer_dir"]),
        out_path=Path(payload["out_path"]),
    )
    return {"tokens": tokens, "path": payload["out_path"]}


def _val_path(context: StageContext[LmJobSpec]) -> Path:
    return context.workspace.path / "shards" / f"{VAL_SHARD}.npy"


def tokenise_shards(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    ws = context.workspace
    plan = lm.CorpusPlan.from_json(ws.split_file.read_text())
    common = {"tokenizer_dir": str(ws.tokenizer_dir)}
    items = [
        QueueItem(
            key=f"shard-{k}",
            payload={
                "name": f"shard {k}",
                "files": files,
                "out_path": str(ws.shard_tokens(k)),
                **common,
            },
        )
        for k, files in enumerate(plan.train_shards)
    ]
    items.append(
        QueueItem(
            key="shard-val",
            payload={
                "name": "the validation shard",
                "files": plan.val_files,
                "out_path": str(_val_path(context)),
                **common,
            },
        )
    )
    results = run_queue_stage(context, "tokenise", items, handler="lm.tokenise")
    train_tokens = sum(r["tokens"] for r in results[:-1])
    context.log(f"tokenise: {train_tokens} training tokens, {results[-1]['tokens']} validation")
    return {"train_tokens": train_tokens, "val_tokens": results[-1]["tokens"]}


def merge_shards(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    ws = context.workspace
    shards = context.outputs["split"]["shards"]
    train = lm.merge_token_files([ws.shard_tokens(k) for k in range(shards)], ws.train_tokens)
    val = lm.merge_token_files([_val_path(context)], ws.val_tokens)
    seq_len = context.spec.hyperparameters.seq_len
    for label, count in (("training", train), ("validation", val)):
        if count <= seq_len:
            # a window is seq_len + 1 tokens: fewer and there is nothing to train or score on
            raise StageRejected(
                f"the corpus gives {count} {label} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; give a larger dataset or max_corpus_mb"
            )
    context.log(f"merge: {train} training and {val} validation tokens")
    return {"train_tokens": train, "val_tokens": val}


def program_params(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    """The train program's parameters, from the spec and the earlier stages' files."""
    hp = context.spec.hyperparameters
    return {
        "train_tokens": str(context.workspace.train_tokens),
        "val_tokens": str(context.workspace.val_tokens),
        "preset": hp.preset,
        "vocab_size": context.outputs["split"]["vocab_size"],
        "seq_len": hp.seq_len,
        "batch_size": hp.batch_size,
        "max_steps": hp.max_steps,
        "learning_rate": hp.learning_rate,
        "seed": hp.seed,
    }


def train(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    spec = context.spec
    hp = spec.hyperparameters
    result = context.services["workers"].train(
        context,
        ProgramSpec(kind="lm", params=program_params(context)),
        checkpoint_every_steps=hp.checkpoint_every_steps,
    )
    return {
        "metrics": dict(result.metrics),
        "restarts": result.restarts,
        "final_weights": str(result.final_weights),
    }


def evaluate(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    metrics = context.outputs["train"]["metrics"]
    perplexity = float(metrics["perplexity"])
    threshold = context.spec.eval.max_perplexity
    if threshold is not None and perplexity > threshold:
        raise StageRejected(
            f"validation perplexity {perplexity:.2f} is above the threshold {threshold:g}"
        )
    context.log(f"evaluate: validation perplexity {perplexity:.2f} (threshold {threshold})")
    return {"perplexity": perplexity, "val_loss": float(metrics["val_loss"])}


def register(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    ws = context.workspace
    hp = context.spec.hyperparameters
    params = program_params(context)
    model = lm.build_lm(
        lm.lm_preset(hp.preset), vocab_size=params["vocab_size"], seq_len=hp.seq_len, seed=hp.seed
    )
    # the final weights hold both tied tensors (lm_head and the embedding), as copies
    model.load_state_dict(load_file(context.outputs["train"]["final_weights"]))
    lm.export_lm(model, tokenizer_dir=ws.tokenizer_dir, out_dir=ws.export_dir)
    version = register_once(
        context.services["models"],
        context.spec.name,
        ws.export_dir,
        task="generate",
        source=job_source(context.job_id),
    )
    context.log(f"register: {context.spec.name} version {version}")
    return {"model": context.spec.name, "version": version}


def promote_version(context: StageContext[LmJobSpec]) -> dict[str, Any]:
    registered = context.outputs["register"]
    if not context.spec.promote:
        return {"promoted": False}
    previous = promote(context.services["models"], registered["model"], registered["version"])
    context.log(f"promote: serving alias {previous} -> {registered['version']}")
    return {"promoted": True, "previous": previous}


def job_metrics(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What a finished lm job reports, from its stages' outputs."""
    train = outputs["train"]["metrics"]
    return {
        "perplexity": outputs["evaluate"]["perplexity"],
        "val_loss": outputs["evaluate"]["val_loss"],
        "train_loss": train.get("train_loss"),
        "samples_per_s": train.get("samples_per_s"),
        "loop_samples_per_s": train.get("loop_samples_per_s"),
        "train_seconds": train.get("train_seconds"),
        "restarts": outputs["train"]["restarts"],
        "model": outputs["register"]["model"],
        "version": outputs["register"]["version"],
        "promoted": outputs["promote"]["promoted"],
    }
