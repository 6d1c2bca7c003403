"""Feasibility of the re-measurement study (nbs/14c_remeasure) on real digits checkpoints: the measures of
`sit_workbench.studies.measures` on each checkpoint of one zoo run, with their wall seconds, on one CPU thread.

    PYTHONPATH=. python benchmarks/remeasure_feasibility.py /work/zoo-runs/full/linear-velocity

Per checkpoint: held-out NLL in bits/dim of the test split (Hutchinson probes, dopri5 at --tol), the held-out
transport loss (stratified t, fixed draws), digits-FID up the Heun NFE ladder until converged (--n balanced-label
samples; the 50- and 250-NFE rungs always), accuracy, and the nearest-neighbour memorisation ratio of the converged
rung's samples; then paired differences of each checkpoint against the last. Reads the checkpoints, writes nothing.
"""
import argparse
import platform
import time
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a zoo run folder holding checkpoint-* folders")
    p.add_argument("--n", type=int, default=1000, help="samples per FID rung")
    p.add_argument("--nll-images", type=int, default=360, help="held-out images for the NLL (the test split has 360)")
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol of the likelihood ODE")
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, nargs="*", default=None, help="checkpoint steps (default: all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from sit_workbench.digits import classifier_features, digits_arrays, load_or_train_classifier
    from sit_workbench.evaluate import digits_reference_rows
    from sit_workbench.run import load_model, read_run
    from sit_workbench.studies.measures import (converged_fid, heldout_loss, heldout_nll, nn_ratio,
                                                paired_bootstrap_difference, paired_difference)
    clf = load_or_train_classifier()
    (xtr, _), (xte, yte) = digits_arrays("train"), digits_arrays("test")
    ref = classifier_features(clf, xte)
    cks = sorted(Path(a.run).glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    if a.steps: cks = [c for c in cks if int(c.name.split("-")[1]) in a.steps]
    print(f"# {platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; {a.run}", flush=True)
    rows, kept = [], {}
    for ck in cks:
        spec = read_run(ck)
        model, tr = load_model(spec).eval(), spec.build_transport()
        t = time.perf_counter()
        nll = heldout_nll(model, tr, xte[:a.nll_images], yte[:a.nll_images], atol=a.tol, rtol=a.tol)
        t_nll = time.perf_counter() - t; t = time.perf_counter()
        loss = heldout_loss(model, tr, xte, yte, bins=10)
        t_loss = time.perf_counter() - t; t = time.perf_counter()
        fid = converged_fid(model, tr, n=a.n, bootstrap=a.bootstrap, clf=clf, keep_samples=True)
        t_fid = time.perf_counter() - t; t = time.perf_counter()
        nn = nn_ratio(fid["samples"], xtr, xte)
        t_nn = time.perf_counter() - t
        kept[ck.name] = (nll["bpd"], loss["losses"], fid)
        rows.append({"checkpoint": ck.name, "nll_bpd": f"{nll['nll_bpd']:.3f} ± {nll['nll_bpd_se']:.3f}",
                     "nll NFE": nll["nfe"], "nll s": round(t_nll, 1),
                     "heldout_loss": f"{loss['heldout_loss']:.4f} ± {loss['heldout_loss_se']:.4f}", "loss s": round(t_loss, 2),
                     "converged FID": f"{fid['converged_fid']:.2f} ± {fid['converged_fid_std']:.2f}",
                     "at NFE": fid["converged_nfe"], "converged": fid["converged"],
                     **{f"FID@{k}": round(v, 2) for k, v in sorted(fid["fids"].items())},
                     "accuracy": round(fid["accuracy"], 3), "fid s": round(t_fid, 1),
                     "nn_ratio": round(nn, 3), "nn s": round(t_nn, 2)})
        print(" | ".join(f"{k}: {v}" for k, v in rows[-1].items()), flush=True)
        print("  rungs: " + "; ".join(f"{k} NFE {v:.2f} ± {fid['fid_stds'][k]:.2f}" + (
            f" (change {fid['steps_diff'][k][0]:+.3f}, paired error {fid['steps_diff'][k][1]:.3f})" if k in fid["steps_diff"] else "")
            for k, v in sorted(fid["fids"].items())) + f"; seconds by NFE {fid['seconds']}", flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows: print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    last = cks[-1].name
    print(f"\npaired differences against {last} (same dequantisation, probes, loss draws, noises and labels):")
    for name, (bpd, losses, fid) in kept.items():
        if name == last: continue
        b, l, f = kept[last]
        d_nll, d_loss = paired_difference(bpd, b), paired_difference(losses, l)
        common = max(set(fid["fids"]) & set(f["fids"]))
        print(f"  {name} - {last}: nll {d_nll['diff']:+.4f} ± {d_nll['diff_se']:.4f} bpd, loss "
              f"{d_loss['diff']:+.5f} ± {d_loss['diff_se']:.5f}; converged FID {fid['converged_fid'] - f['converged_fid']:+.2f} "
              f"(FIDs at {fid['converged_nfe']} and {f['converged_nfe']} NFE)")
    if len({fid["converged_nfe"] for _, _, fid in kept.values()}) == 1:
        for name, (_, _, fid) in kept.items():
            if name == last: continue
            d = paired_bootstrap_difference(fid["features"], kept[last][2]["features"], ref)
            print(f"  paired bootstrap FID {name} - {last}: {d['diff']:+.2f} ± {d['diff_std']:.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
    t = time.perf_counter()
    refs = digits_reference_rows(a.n, clf)
    print(f"\nreference rows at n = {a.n} ({time.perf_counter() - t:.1f} s):")
    for r in refs: print(f"  {r['model']}: {r['digits_fid']:.2f} ± {r['digits_fid_std']:.2f}")


if __name__ == "__main__":
    main()
