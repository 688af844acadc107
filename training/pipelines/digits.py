"""The ``digits`` trainer's pipeline: small classifiers of scikit-learn's handwritten digits.

split (splitter)           the images split, stratified and seeded, into train/validation;
                           one member planned per architecture in the spec (a sweep)
train_members (work queue) one queue item per member, trained in parallel by the job's
                           queue workers, each scored on the same validation split
evaluate (filter)          members below ``eval.min_accuracy`` are dropped; none left
                           fails the job, naming each member's accuracy
register (sink)            each remaining member becomes a version of the job's model
join                       all members done: the best by validation accuracy is chosen
promote (sink)             with ``promote: true``, the ``serving`` alias moves to the best

The ``digits`` record in ``training.trainers.registry`` names ``stages``, the queue handler
``digits.member`` (``train_member_item``) and ``job_metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.queue_workers import QueueItem, run_queue_stage
from training.registration import job_source, promote, register_once
from training.stages import Stage, StageContext, StageRejected
from training.trainers import digits
from training.trainers.digits_spec import DigitsHyperparameters, DigitsJobSpec


def stages() -> list[Stage[DigitsJobSpec]]:
    return [
        Stage("split", "splitter", 0.02, split_data),
        Stage("train_members", "work queue", 0.90, train_members),
        Stage("evaluate", "filter", 0.01, evaluate),
        Stage("register", "sink", 0.04, register),
        Stage("join", "join", 0.01, join),
        Stage("promote", "sink", 0.02, promote_best),
    ]


def member_names(archs: Sequence[str]) -> list[str]:
    """One name per member: the arch, numbered when a sweep repeats it.

    ["mlp", "cnn"] -> ["mlp", "cnn"]; ["mlp", "mlp"] -> ["mlp-1", "mlp-2"]."""
    totals = Counter(archs)  # one pass to count, one to name: linear in the sweep's size
    seen: Counter[str] = Counter()
    names = []
    for arch in archs:
        seen[arch] += 1
        names.append(arch if totals[arch] == 1 else f"{arch}-{seen[arch]}")
    return names


def split_data(context: StageContext[DigitsJobSpec]) -> dict[str, Any]:
    hp = context.spec.hyperparameters
    split = digits.load_digits_split(seed=hp.seed)
    archs = hp.members()
    members = dict(zip(member_names(archs), archs, strict=True))
    context.log(
        f"split: {len(split.y_train)} training and {len(split.y_val)} validation images; "
        f"members {', '.join(members)}"
    )
    return {"train": len(split.y_train), "val": len(split.y_val), "members": members}


def train_member_item(payload: dict[str, Any]) -> dict[str, Any]:
    """Queue handler ``digits.member``: train one member, score it, export its folder."""
    hp = DigitsHyperparameters.model_validate(payload["hyperparameters"])
    split = digits.load_digits_split(seed=hp.seed)  # the same split for every member
    member = digits.train_digits_member(payload["arch"], hp, split, seed=payload["seed"])
    digits.export_digits(member, Path(payload["out_dir"]))
    return {
        "member": payload["name"],
        "arch": payload["arch"],
        "path": payload["out_dir"],
        **{key: float(value) for key, value in member.metrics.items()},
    }


def train_members(context: StageContext[DigitsJobSpec]) -> dict[str, Any]:
    hp = context.spec.hyperparameters
    members = context.outputs["split"]["members"]
    items = [
        QueueItem(
            key=f"member-{name}",
            payload={
                "name": name,
                "arch": arch,
                "hyperparameters": hp.model_dump(mode="json"),
                "seed": hp.seed + i,  # members differ in their initial weights
                "out_dir": str(context.workspace.member_dir(name)),
            },
        )
        for i, (name, arch) in enumerate(members.items())
    ]
    results = run_queue_stage(context, "train_members", items, handler="digits.member")
    for r in results:
        context.log(f"member {r['member']}: validation accuracy {r['val_accuracy']:.4f}")
    return {"members": results}


def evaluate(context: StageContext[DigitsJobSpec]) -> dict[str, Any]:
    threshold = context.spec.eval.min_accuracy
    members = context.outputs["train_members"]["members"]
    passed = [m for m in members if threshold is None or m["val_accuracy"] >= threshold]
    rejected = [m["member"] for m in members if m not in passed]
    if not passed:
        scores = ", ".join(f"{m['member']} {m['val_accuracy']:.4f}" for m in members)
        raise StageRejected(
            f"no member reached the minimum validation accuracy {threshold:g} ({scores})"
        )
    if rejected:
        context.log(f"evaluate: below {threshold:g}, dropped: {', '.join(rejected)}")
    return {"passed": [m["member"] for m in passed], "rejected": rejected}


def register(context: StageContext[DigitsJobSpec]) -> dict[str, Any]:
    by_name = {m["member"]: m for m in context.outputs["train_members"]["members"]}
    versions = {}
    for name in context.outputs["evaluate"]["passed"]:
        context.check_stop()
        versions[name] = register_once(
            context.services["models"],
            context.spec.name,
            Path(by_name[name]["path"]),
            task="classify",
            source=job_source(context.job_id, name),
        )
        context.log(f"register: member {name} -> {context.spec.name} version {versions[name]}")
    return {"model": context.spec.name, "versions": versions}


def join(context: StageContext[DigitsJobSpec]) -> dict[str, Any]:
    """All members are done and registered: the best by validation accuracy (the first named
    on a tie) is the job's result."""
    accuracy = {m["member"]: m["val_accuracy"] for m in context.outputs["train_members"]["members"]}
    versions = context.outputs["register"]["versions"]
    best = max(versions, key=lambda name: accuracy[name])
    return {
        "best": best,
        "version": versions[best],
        "val_accuracy": accuracy[best],
        "accuracies": accuracy,
    }


def promote_best(context: StageContext[DigitsJobSpec]) -> dict[str, Any]:
    joined = context.outputs["join"]
    if not context.spec.promote:
        return {"promoted": False}
    previous = promote(context.services["models"], context.spec.name, joined["version"])
    context.log(f"promote: serving alias {previous} -> {joined['version']} ({joined['best']})")
    return {"promoted": True, "previous": previous}


def job_metrics(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What a finished digits job reports, from its stages' outputs: the best member's."""
    joined = outputs["join"]
    return {
        "val_accuracy": joined["val_accuracy"],
        "best_member": joined["best"],
        "accuracies": joined["accuracies"],
        "model": outputs["register"]["model"],
        "version": joined["version"],
        "versions": outputs["register"]["versions"],
        "promoted": outputs["promote"]["promoted"],
    }
