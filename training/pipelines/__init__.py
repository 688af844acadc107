"""Each trainer's pipeline: its stages, in order, the queue handlers its stages use, and the
metrics a finished job reports; one module per trainer, named by its record in
``training.trainers.registry``:

    stages = TRAINERS.stages("lm")  # [split, tokenise, merge, train, evaluate, register, promote]
"""
