"""Distil with a recipe for a fixed number of steps and save the final set, to compare two commits bit for bit.

    # in a worktree of each commit (PYTHONPATH picks that commit's package):
    PYTHONPATH=/tmp/old python benchmarks/same_set.py old 2400 /tmp/old/recipes/frepo/mnist_ipc1_cpu_lr3e-3.yaml \\
        --data.init_args.root=../shared/datasets --trainer.max_time=null
    PYTHONPATH=/tmp/new python benchmarks/same_set.py new 2400 /tmp/new/recipes/frepo/mnist_ipc1_cpu_lr3e-3.yaml \\
        --data.init_args.root=../shared/datasets --trainer.max_time=null
    python -c "import torch; a, b = torch.load('old.pt'), torch.load('new.pt'); \\
        print(torch.equal(a['x'], b['x']), torch.equal(a['y'], b['y']))"

One torch thread, no logger, no wall-clock cap (``--trainer.max_time=null``) so both runs take the same steps.
"""

from __future__ import annotations

import sys

import torch


def main() -> None:
    import lightning_distill
    from lightning_distill.cli import cli_main

    out, steps, recipe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print("package:", lightning_distill.__file__, file=sys.stderr)
    torch.set_num_threads(1)
    args = [
        "--config",
        recipe,
        f"--trainer.default_root_dir=runs/same_set/{out}",
        "--trainer.logger=false",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.download=false",
        *sys.argv[4:],
    ]
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    x, y = (t.detach().cpu().clone() for t in cli.model.synthetic())
    torch.save({"x": x, "y": y, "step": cli.trainer.global_step}, f"{out}.pt")
    print("saved", f"{out}.pt", "at step", cli.trainer.global_step)


if __name__ == "__main__":
    main()
