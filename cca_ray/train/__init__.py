"""Stage `train` (and `pretrain`): Ray Train workers running DeepSpeed over one model family's scorer.

Read in this order:
    driver.py      the Ray Train side: run_training (TorchTrainer named after the run, so the same
                   name resumes it), the worker entry, export of the last checkpoint
    recipe.py      one rank's loop, top to bottom: setup / step / report / checkpoint
    engine.py      its DeepSpeed engine configs, the lr schedule, the knob a run trains, process groups
    batches.py     which rows a rank reads at each step (a pure function of the step), micro-batches
    checkpoint.py  sharded DeepSpeed checkpoints and the consolidated export
    reference.py   the reference pass: the frozen base model scores every pair once (pairs_ref/)
    pretrain.py    the demo's base model: SFT with condition dropout on the same trainer
"""
