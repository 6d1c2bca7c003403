"""Why the λ-weighted (likelihood-weighted) VP score cell samples so badly on digits: where its loss weight puts the
training signal, and what that leaves of the model, beside the unweighted VP score cell at the same training step.

    SIT_WORKBENCH_ZOO=/work/zoo-runs python benchmarks/lambda_weight.py --steps 3000

Prints (1) the weight w_t = drift_var / sigma_t^2 of `create_transport("VP", "score", "likelihood")` across its training
interval; (2) for each cell, the share of its own held-out training loss that falls in each tenth of that interval
(the same stratified draws for both cells: `studies.measures.heldout_loss`); (3) for each cell, the mean squared error
of its noise prediction (-sigma_t * score against the noise drawn) and of its denoised image (Tweedie) on 400 test
digits at fixed times, on the same draws. Reads the zoo's checkpoints, writes nothing.
"""
import argparse
import platform

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="the training step of both cells' checkpoints")
    p.add_argument("--setting", default="full")
    p.add_argument("--images", type=int, default=400)
    a = p.parse_args()
    torch.set_num_threads(1)
    from sit_workbench.checkpoint import load_sit
    from sit_workbench.digits import digits_arrays
    from sit_workbench.solvers import data_prediction
    from sit_workbench.studies.measures import heldout_loss
    from sit_workbench.studies.zoo import zoo_checkpoint, zoo_config
    from sit_workbench.transport import create_transport, transport_from_config
    print(f"# {platform.machine()}, 1 thread, torch {torch.__version__}; zoo setting {a.setting}, step {a.steps}")

    tr = create_transport("VP", "score", "likelihood")
    lo, hi = tr.check_interval(tr.train_eps, tr.sample_eps)
    x = torch.zeros(1, 1, 1, 1)
    ts = [lo, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, hi]
    print(f"\n(1) likelihood weight on the training interval [{lo:g}, {hi:g}]")
    print("  " + "  ".join(f"t={t:g}: {float(tr.loss_weight(x, torch.tensor([t])).flatten()[0]):.3g}" for t in ts))

    (xte, yte) = digits_arrays("test")
    cells = ["vp-score", "vp-score-lambda"]
    models = {}
    for name in cells:
        ck = zoo_checkpoint(name, a.setting, a.steps)
        models[name] = (load_sit(ck).eval(), transport_from_config(zoo_config(name, a.setting, a.steps).model_config))

    print("\n(2) share of each cell's own held-out loss by tenth of the training interval (all 360 test digits)")
    for name, (m, t) in models.items():
        with torch.no_grad(): bins = heldout_loss(m, t, xte, yte, bins=10)["bins"]
        total = sum(b["loss"] for b in bins)
        print(f"  {name:16s} " + " ".join(f"{b['loss'] / total:6.1%}" for b in bins))

    x1 = torch.as_tensor(xte[:a.images]).float()
    y = torch.as_tensor(yte[:a.images]).long()
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    times = [0.2, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999]
    print(f"\n(3) on {a.images} test digits, the same noise for both cells, at t = " + ", ".join(map(str, times)))
    for what in ("noise MSE", "denoised MSE"):
        for name, (m, t) in models.items():
            out = []
            for tt in times:
                tv = torch.full((len(x1),), tt)
                _, xt, _ = t.path_sampler.plan(tv, x0, x1)
                sigma = t.path_sampler.compute_sigma_t(torch.tensor(tt))[0]
                with torch.no_grad(): score = m(xt, tv, y=y)
                err = (-sigma * score - x0) if what == "noise MSE" else (data_prediction(t.path_sampler, "score", score, xt, tv) - x1)
                out.append(err.pow(2).mean().item())
            print(f"  {what:13s} {name:16s} " + " ".join(f"{v:7.4f}" for v in out))


if __name__ == "__main__":
    main()
