"""Figure tables of the docs, rendered from the committed results JSON they restate, never typed by hand.

A page marks each generated table with ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; :data:`TABLES` maps
``NAME`` to a function that builds the Markdown from the JSON files in ``docs/figures/`` (or a zoo record).
``python scripts/render_docs_tables.py`` rewrites every marked block; ``tests/test_docs_tables.py`` fails when a
page's block differs from what its JSON renders, so a published figure cannot drift from the run behind it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval import diffpure_tables
from eval.run_folder import read_record

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
ZOO = ROOT / "manifold_defense" / "zoo" / "weights"

__all__ = ["QUOTES", "TABLES", "pages", "render", "render_page", "stale_blocks"]


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return read_record(path) if isinstance(data, dict) and "sha256" in data else data


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def tstar_table() -> str:
    """DiffPure's t* sweep on the validation split (``diffpure-tstar``)."""
    rec = _json(FIGURES / "diffpure_tstar.json")
    probe = f"BPDA + EOT probe, Linf {rec['protocol']['probe_eps']}"
    header = ["t*", "clean accuracy (worst of draws)", probe, "UNet passes / image", "chosen"]
    lines = [_row(header), _row(["---"] * 5)]
    for r in rec["rows"]:
        chosen = "**yes**" if r["t_star"] == rec.get("chosen") else ""
        lines.append(_row([r["t_star"], f"{r['clean_accuracy']:.3f} (n {r['n']})",
                           f"{r['probe_accuracy']:.3f} (n {r['probe_n']})", r["network_passes_per_image"], chosen]))  # fmt: skip
    test = rec.get("test")
    if test:
        lines.append("")
        mean, per = test.get("clean_accuracy_mean_of_draws"), test.get("clean_accuracy_per_draw")
        one = (f"; each draw alone: {' / '.join(f'{a:.3f}' for a in per)} (mean {mean:.3f})"
               if mean is not None and per else "")  # fmt: skip
        lines.append(f"At the chosen t* = {test['t_star']}, defended clean accuracy on the first {test['n']} test "
                     f"images (worst of {test['draws']} draws): **{test['clean_accuracy']:.3f}**{one}.")  # fmt: skip
    return "\n".join(lines)


def cost_table() -> str:
    """Seconds and network passes per purified image, side by side (``purifier-cost``)."""
    rec = _json(FIGURES / "purifier_cost.json")
    lines = [_row(["purifier", "network passes / image", "seconds / image (median of rounds)", "time / DiffPure's"]),
             _row(["---"] * 4)]  # fmt: skip
    for name, r in rec["purifiers"].items():
        lines.append(_row([name, f"{r['passes_per_image']:g} ({r['network']})", f"{r['seconds_per_image']:.3f}",
                           f"{r['time_over_diffpure']:g}x"]))  # fmt: skip
    lines.append("")
    lines.append(f"{rec['n']} test images, {rec['device']}, {rec['threads']} thread(s); load average "
                 f"{rec['load_average_before'][0]} before, {rec['load_average_after'][0]} after.")  # fmt: skip
    return "\n".join(lines)


def _screens() -> list[tuple[int, dict[str, Any]]]:
    """Sample figures of other checkpoints of the DDPM run (later ones screened, earlier ones once shipped), or of
    the same weights under another sampler: ``(step, samples)`` from ``docs/figures/ddpm_screen_<step>[_<tag>].json``
    (a zoo record written by ``measure-zoo --weights-dir``), by step then sampler passes."""
    out = []
    for path in FIGURES.glob("ddpm_screen_*.json"):
        step = int(path.stem.removeprefix("ddpm_screen_").split("_")[0])
        out.append((step, json.loads(path.read_text())["figures"]["samples"]))
    return sorted(out, key=lambda t: (t[0], _passes(t[1])))


def _passes(samples: dict[str, Any]) -> int:
    """The DDIM network passes per sample of a sample-quality record (older records state them only in words)."""
    if "ddim_steps" in samples:
        return int(samples["ddim_steps"])
    found = re.search(r"(\d+) network passes", samples["sampler"])
    if found is None:
        raise ValueError(f"expected a sampler with its network passes, got {samples['sampler']!r}")
    return int(found.group(1))


def samples_table() -> str:
    """Sample quality of checkpoints of the DDPM run and samplers (``docs/figures/ddpm_screen_*.json``, the shipped
    weights among them) beside ``mnist-gan`` at the same sample count (``measure-zoo``'s protocol)."""
    steps = json.loads((ZOO / "mnist-ddpm.json").read_text())["training"]["config"]["steps"]
    gan = _json(FIGURES / "gan_samples_equal_n.json")
    screens = _screens()
    counts = {m["n"] for _, m in screens} | {gan["n"]}
    if len(counts) != 1:
        raise ValueError(f"expected every column of the equal-count table at one sample count, got {sorted(counts)}")
    floor = screens[0][1]["floor_train_vs_test"]
    head = ["figure", *[f"{s} steps, DDIM {_passes(m)}" + (" (shipped weights)" if s == steps else "")
                        for s, m in screens], "mnist-gan", "real-data floor", "target"]  # fmt: skip
    lines = _sample_rows(head, [m for _, m in screens] + [gan], floor, timed=len(screens))
    lines.append("")
    lines.append(f"{floor['n']} samples each against the first {floor['n']} test images; DDIM with eta 0, the "
                 "stated network passes per sample, seed 0.")  # fmt: skip
    return "\n".join(lines)


_SAMPLE_KEYS = (("mnist_score", "MNIST score", ">= 9.0"), ("frechet_features", "Fréchet distance, classifier features",
                "<= 50"), ("confident_fraction", "share classified with confidence >= 0.9", ""),
                ("histogram_min_max", "class histogram min/max", ""), ("histogram_tv", "class TV from the test balance", ""))  # fmt: skip


def _sample_rows(head: list[str], columns: list[dict[str, Any]], floor: dict[str, Any], timed: int) -> list[str]:
    """The rows of a sample-quality table: one per figure over ``columns``, the distance above the real-data floor
    at each column's own sample count after the Fréchet row (``floor`` where a column has none), and the seconds per
    sample of the first ``timed`` columns."""
    lines = [_row(head), _row(["---"] * len(head))]
    for key, label, target in _SAMPLE_KEYS:
        lines.append(_row([label, *[f"{m[key]:.4g}" for m in columns], f"{floor[key]:.4g}", target]))
        if key == "frechet_features":
            above = [f"{m[key] - m.get('floor_train_vs_test', floor)[key]:.4g}" for m in columns]
            lines.append(_row(["Fréchet distance above the floor (its own count)", *above, "0", ""]))
    lines.append(_row(["seconds per sample (as measured, load varies)",
                       *[f"{m['seconds_per_sample']:.3g}" for m in columns[:timed]],
                       *["-"] * (len(columns) - timed), "-", ""]))  # fmt: skip
    return lines


def samples_zoo_table() -> str:
    """The zoo records' sample figures: the shipped ``mnist-ddpm`` beside ``mnist-gan``, each at its own count."""
    rec = json.loads((ZOO / "mnist-ddpm.json").read_text())
    ddpm, steps = rec["figures"]["samples"], rec["training"]["config"]["steps"]
    gan = _zoo("mnist-gan")["samples"]
    floor = ddpm["floor_train_vs_test"]
    head = ["figure", f"mnist-ddpm (shipped: {steps} steps, DDIM {_passes(ddpm)}; {ddpm['n']} samples)",
            f"mnist-gan ({gan['n']} samples)", f"real-data floor ({floor['n']})", "target"]  # fmt: skip
    lines = _sample_rows(head, [ddpm, gan], floor, timed=1)
    same = ddpm["n"] == gan["n"] == floor["n"] == gan["floor_train_vs_test"]["n"]
    lines.append("")
    lines.append("Both records at the same count, the floor at it too." if same else
                 "The two records are at different sample counts: the Fréchet distances are not comparable across "
                 "columns; the distance above each column's own floor is (the floor column is the `mnist-ddpm` "
                 "record's).")  # fmt: skip
    return "\n".join(lines)


def _zoo(name: str) -> dict[str, Any]:
    figures: dict[str, Any] = json.loads((ZOO / f"{name}.json").read_text())["figures"]
    return figures


def _aa_budget(figure: dict[str, Any]) -> str:
    """How a table names the budget an AutoAttack figure of a zoo record ran."""
    from eval.autoattack import BUDGET_LABELS, budget_of

    return BUDGET_LABELS[budget_of(figure)]


def zoo_autoattack_table() -> str:
    """Every AutoAttack figure in the classifiers' zoo records, with the budget it ran, its n and its command."""
    from eval.cli import console_spelling

    lines = [_row(["model", "threat", "budget", "clean / robust", "n", "command"]), _row(["---"] * 6)]
    for name in ("mnist-classifier", "mnist-pgd-at", "mnist-l2-at", "mnist-rmd"):
        fig = _zoo(name)
        for key in sorted(k for k in fig if k.startswith("autoattack_")):
            aa = fig[key]
            lines.append(_row([f"`{name}`", key.removeprefix("autoattack_").replace("_", " "), _aa_budget(aa),
                               f"{aa['clean_accuracy']:.3f} / **{aa['robust_accuracy']:.3f}**", aa["n"],
                               f"`{console_spelling(aa['command'])}`"]))  # fmt: skip
    return "\n".join(lines)


def headline_table() -> str:
    """The README's headline figures beside the leaderboard, each read from its committed JSON or zoo record."""
    clf, pgd, l2, rmd = _zoo("mnist-classifier"), _zoo("mnist-pgd-at"), _zoo("mnist-l2-at"), _zoo("mnist-rmd")
    op = _json(FIGURES / "op_pgd_at_pac50k_results.json")["defenses"]["undefended"]["attacks"]["overpowered"]
    op = op["l2-1.5"]
    bench = _json(FIGURES / "bench_h200_results.json")
    cs = _json(FIGURES / "csgm_pacgan50k_results.json")
    gan = _zoo("mnist-gan")
    dd = _zoo("mnist-ddpm")["samples"]
    s, floor = gan["samples"], gan["samples"]["floor_train_vs_test"]
    amb = _json(FIGURES / "ambient_grid_results.json")
    causal = _zoo("causal-digit-gan")["checks"]
    aa, on = "autoattack_l2_2.5", "onmanifold_l2_1.5"

    def score(method: str, point: str) -> str:
        return next(f"{r['mnist_score']:.2f}" for r in amb["methods"][method] if r["point"] == point)

    def trio(point: str) -> str:
        return " / ".join(score(m, point) for m in ("ambient", "ignore", "unmeasure"))

    c = causal["causal"]
    rows = [
        ["`mnist-classifier`, `mnist-pgd-at`", "clean, whole test split; `mnist-pgd-at`: AutoAttack Linf 0.3 "
         f"({_aa_budget(pgd['autoattack_linf_0.3'])})",
         f"{clf['clean_accuracy']:.4f}, {pgd['clean_accuracy']:.4f}; {pgd['autoattack_linf_0.3']['robust_accuracy']:.3f}",
         f"{clf['n']}, {pgd['n']}; {pgd['autoattack_linf_0.3']['n']}",
         "[zoo](docs/zoo.md), [robust training](docs/robust-training.md)"],
        ["`mnist-l2-at` vs `mnist-rmd`",
         f"clean; AutoAttack l2 2.5 ({_aa_budget(l2[aa])}); on-manifold success, l2 1.5; the paper's claim",
         f"{l2['clean_accuracy']:.4f} vs {rmd['clean_accuracy']:.4f}; {l2[aa]['robust_accuracy']:.3f} vs "
         f"{rmd[aa]['robust_accuracy']:.3f}; {l2[on]['success_rate']:.3f} vs {rmd[on]['success_rate']:.3f}; "
         "**not reproduced**", f"{l2['n']}; {l2[aa]['n']}; {l2[on]['n']} / {rmd[on]['n']}",
         "[robust manifold](docs/robust-manifold.md)"],
        ["overpowered pair attack on `mnist-pgd-at`", "consistent starts, pair l2 <= 1.5, 300 / 3000 steps",
         f"{op['consistency_at_steps']['300']:.3f} / {op['consistency_at_steps']['3000']:.3f}", op["attacked"],
         "[robust training](docs/robust-training.md)"],
        ["projection cost", "generator passes, Defense-GAN's over the fast schedule's; batched over looped "
         f"restarts ({bench['device_name']})",
         f"{bench['evals_ratio']:.1f}x; {bench['batched_over_loop']:.0f}x",
         f"{bench['settings']['n']}; {bench['batched_vs_loop']['n']}", "[performance](docs/performance.md)"],
        ["compressed sensing (CSGM, `mnist-gan`)", "per-pixel MSE at m = " + " / ".join(map(str, cs["m"])),
         " / ".join(f"{v:.4f}" for v in cs["methods"]["csgm-gan"]["mse"]), cs["protocol"]["n_images"],
         "[compressed sensing](docs/compressed-sensing.md)"],
        ["the prior `mnist-gan`", "Fréchet distance (floor); MNIST score (floor); class histogram min/max (floor); "
         "accuracy on Defense-GAN projections",
         f"{s['frechet_features']:.1f} ({floor['frechet_features']:.2f}); {s['mnist_score']:.2f} "
         f"({floor['mnist_score']:.2f}); {s['histogram_min_max']:.2f} ({floor['histogram_min_max']:.2f}); "
         f"{gan['defense_gan_projection']['accuracy_on_projections']:.3f}", f"{s['n']}; {gan['n']}",
         "[prior](docs/prior.md)"],
        ["the diffusion prior `mnist-ddpm`", f"MNIST score (floor); Fréchet distance (floor), DDIM {_passes(dd)} passes",
         f"{dd['mnist_score']:.2f} ({dd['floor_train_vs_test']['mnist_score']:.2f}); {dd['frechet_features']:.1f} "
         f"({dd['floor_train_vs_test']['frechet_features']:.1f})", f"{dd['n']}", "[diffusion](docs/diffusion.md)"],
        ["AmbientGAN", "MNIST score, ambient / ignore / unmeasure, "
         f"{amb['protocol']['steps']} steps: block-pixels p 0.9; blur + noise sigma 0.2",
         f"{trio('block-pixels-p0.9')}; {trio('convolve-noise-sigma0.2')}", amb["protocol"]["n_samples"],
         "[ambient](docs/ambient.md)"],
        ["CausalGAN (known causal truth)", "controller joint TVD; digits under do(T = thick) / T = thick, TVD "
         f"to the exact laws ({c['exact do vs condition T=thick']:.3f} apart); reversed graph, do(T = thick)",
         f"{c['controller_joint_tvd']:.4f}; {c['do(T=thick) D tvd']:.4f} / {c['T=thick D tvd']:.3f}; "
         f"{causal['reversed']['do(T=thick) D tvd']:.3f}", _zoo("causal-digit-gan")["n_samples_per_setting"],
         "[causal](docs/causal.md)"],
    ]  # fmt: skip
    lines = [_row(["result", "figure", "value", "n", "details"]), _row(["---"] * 5)]
    return "\n".join(lines + [_row(r) for r in rows])


def _robustness(name: str) -> dict[str, Any]:
    return _json(FIGURES / name)


def history_preset_table() -> str:
    """The defense preset (fast projection, first 100 test images) on the plain 30k prior and on the shipped one."""
    runs = [("plain DCGAN, 30k steps", "defense_gan30k_results.json"),
            ("PacGAN2, 50k steps (shipped)", "defense_pac50k_results.json")]  # fmt: skip
    lines = [_row(["prior", "threat", "naive transfer", "BPDA + EOT (10 steps) alone", "worst case", "n", "source"]),
             _row(["---"] * 7)]  # fmt: skip
    for label, name in runs:
        d = _robustness(name)["defenses"]["projection-fast"]
        for tk, worst in d["worst_case"].items():
            lines.append(_row([label, tk, f"{d['attacks']['pgd'][tk]['accuracy_alone']:.2f}",
                               f"{d['attacks']['bpda-eot-pgd'][tk]['accuracy_alone']:.2f}", f"**{worst:.2f}**",
                               d["n"], f"[{name}](figures/{name})"]))  # fmt: skip
    return "\n".join(lines)


def history_csgm_table() -> str:
    """CSGM-GAN per-pixel MSE on each prior the zoo shipped or tried (same protocol and seeds)."""
    runs = [("plain DCGAN, 30k steps", "csgm_gan30k_results.json", "csgm_gan30k_m50_n300_results.json"),
            ("PacGAN2, 30k steps", "csgm_pacgan_results.json", None),
            ("PacGAN2, 50k steps (shipped)", "csgm_pacgan50k_results.json", "csgm_pac50k_m50_n300_results.json")]  # fmt: skip
    lines = [_row(["prior", "m = 50", "m = 100", "m = 200", "n", "m = 50, n = 300", "sources"]), _row(["---"] * 7)]
    for label, name, n300 in runs:
        d = _json(FIGURES / name)
        mse = dict(zip(d["m"], d["methods"]["csgm-gan"]["mse"], strict=True))
        big = "-" if n300 is None else f"{_json(FIGURES / n300)['methods']['csgm-gan']['mse'][0]:.4f}"
        links = ", ".join(f"[{f}](figures/{f})" for f in (name, n300) if f)
        lines.append(_row([label, *(f"{mse[m]:.4f}" for m in (50, 100, 200)), d["protocol"]["n_images"], big, links]))
    return "\n".join(lines)


def history_rmd_table() -> str:
    """The fast projection with each classifier inside, full cascade at L2 2 and 4, on the 14k-step prior."""
    lines = [_row(["classifier inside", "L2 2", "L2 4", "n", "source"]), _row(["---"] * 5)]
    for clf in ("classifier", "l2_at", "rmd"):
        name = f"robust_manifold_projection_{clf}.json"
        rec = _robustness(name)
        d = rec["defenses"]["projection-fast"]
        model = rec["models"].split(",")[0].removeprefix("classifier ")
        lines.append(_row([f"`{model}`", f"{d['worst_case']['l2-2']:.2f}", f"{d['worst_case']['l2-4']:.2f}", d["n"],
                           f"[{name}](figures/{name})"]))  # fmt: skip
    return "\n".join(lines)


#: DiffPure's runs on the 8000-step ``mnist-ddpm`` (t* 200), replaced with the 17750-step weights: (label, file
#: under ``docs/figures/history/ddpm8000``, defense, threats).
HISTORY_DIFFPURE = (
    ("DiffPure", "diffpure-classifier_linf-0.3_n100.json", "diffpure", ("linf-0.3",)),
    ("DiffPure", "diffpure_cascade_results.json", "diffpure", ("l2-2",)),
    ("DiffPure", "diffpure-classifier_l2-4_n100.json", "diffpure", ("l2-4",)),
    ("DiffPure, fixed noise", "diffpure-fixed-classifier_linf-0.3_n100.json", "diffpure-fixed", ("linf-0.3",)),
    ("DiffPure, fixed noise", "diffpure_fixed_cascade_results.json", "diffpure-fixed", ("l2-2",)),
    ("DiffPure, fixed noise", "diffpure-fixed-classifier_l2-4_n100.json", "diffpure-fixed", ("l2-4",)),
)  # fmt: skip


def history_diffpure_table() -> str:
    """DiffPure on the 8000-step diffusion prior (t* 200): worst case, convergence, majority vote, per threat."""
    from eval.leaderboard_rows import converged_verdict, read_results, row_spec, standard_error

    folder = FIGURES / "history" / "ddpm8000"
    head = ["defense", "threat", "worst case ± se (n)", "converged", "majority vote", "cascade", "source"]
    lines = [_row(head), _row(["---"] * len(head))]
    for label, name, defense, threats in HISTORY_DIFFPURE:
        spec = row_spec("diffpure-classifier" if defense == "diffpure" else "diffpure-fixed-classifier")
        rec, version = read_results(folder / name, spec, defense)
        d = rec["defenses"][defense]
        stages = set((rec.get("settings") or {}).get("attacks", ()))
        cascade = "today's" if {"apgd-t", "fab"} <= stages else "before `apgd-t` and `fab`"
        if rec.get("incomplete"):
            cascade += ", stopped run"
        for tk in threats:
            w, n = float(d["worst_case"][tk]), int(d["n"])
            maj = (d.get("majority_vote") or {}).get("accuracy", {}).get(tk)
            lines.append(_row([label, tk, f"{w:.2f} ± {standard_error(w, n):.3f} (n {n})",
                               converged_verdict(d, tk, version)[0], "-" if maj is None else f"{maj:.2f}", cascade,
                               f"[{name}](figures/history/ddpm8000/{name})"]))  # fmt: skip
    return "\n".join(lines)


QUOTES: tuple[tuple[str, str, str, str], ...] = (
    ("fast projection, full cascade, worst case Linf 0.3 / L2 2 / L2 4 (n 200 / 100 / 100 on the shipped prior; "
     "the undefended classifier and the blends prior in parentheses)", "9718701", "README.md",
     "(undefended: 0.00 / 0.125 / 0.00; blends prior: 0.005 / 0.43 / 0.01) | 0.245 / 0.70 / 0.09 | 200 / 100 / 100"),
    ("projection cost: the fast schedule's median MSE against Defense-GAN's", "9718701", "README.md",
     "now at higher median MSE (0.0034 vs 0.0026; on the blends prior it was lower)"),
    ("overpowered pair attack on `mnist-pgd-at`, after 300 / 3000 steps, blends prior in parentheses", "9718701",
     "README.md", "still falling at 3000 (blends: 0.41 / 0.07) | 0.765 / 0.625"),
    ("compressed sensing: Lasso's measurements over CSGM's at m = 50; CSGM-GAN MSE at m = 100", "9718701",
     "README.md", "(plain 30k: 0.0078; 14k: 0.0090) | 5.44 (blends: 6.01; csgm-gan alone 4.88); 0.0082"),
    ("the prior: Fréchet distance; MNIST score; histogram min/max; TV; accuracy on projections, plain DCGAN 30k "
     "in parentheses", "9718701", "README.md",
     "(plain DCGAN, 30k steps: 139.3; 8.09; 0.29; 0.134; 0.991)"),
    ("`mnist-l2-at` vs `mnist-rmd` inside the fast projection, L2 2, on the 14k prior", "9718701", "README.md",
     "full cascade at L2 2 (`mnist-classifier` inside: 0.60)"),
)  # fmt: skip
"""Figures of earlier priors that no committed JSON holds, quoted verbatim from a committed page: (what, commit,
path, quote); ``git show COMMIT:PATH`` holds each quote (``tests/test_leaderboard.py`` checks it)."""


def history_quotes_table() -> str:
    """The quoted figures of earlier priors, each with the commit and page that hold it."""
    lines = [_row(["figure", "quoted", "source"]), _row(["---"] * 3)]
    for what, commit, path, quote in QUOTES:
        lines.append(_row([what, quote.replace("|", "\\|"), f"`git show {commit}:{path}`"]))
    return "\n".join(lines)


def _leaderboard_tables() -> dict[str, Callable[[], str]]:
    from eval.leaderboard import RENDERERS

    return dict(RENDERERS)


TABLES: dict[str, Callable[[], str]] = {"diffpure-tstar": tstar_table, "purifier-cost": cost_table,
                                        "ddpm-samples": samples_table, "ddpm-samples-zoo": samples_zoo_table, "zoo-autoattack": zoo_autoattack_table, "headline": headline_table,
                                        "history-preset": history_preset_table, "history-csgm": history_csgm_table,
                                        "history-rmd-projection": history_rmd_table,
                                        "history-quotes": history_quotes_table,
                                        "history-diffpure": history_diffpure_table,
                                        **_leaderboard_tables()}  # fmt: skip
TABLES |= {"diffpure-cascade": diffpure_tables.cascade_table, "diffpure-transfer": diffpure_tables.transfer_table,
           "diffpure-exact": diffpure_tables.exact_table, "diffpure-eval-cost": diffpure_tables.cost_table}  # fmt: skip


def _deepinv_tables() -> dict[str, Callable[[], str]]:
    from eval.deepinv_crosscheck import RENDERERS

    return dict(RENDERERS)


TABLES |= _deepinv_tables()  # issue 36: deepinv cross-check and the diffusion prior in compressed sensing


def _cascade_tables() -> dict[str, Callable[[], str]]:
    from eval.cascade_profile import RENDERERS

    return dict(RENDERERS)


TABLES |= _cascade_tables()  # issue 35: the cascade's profile and the lean-versus-full comparison


def _anatomy_tables() -> dict[str, Callable[[], str]]:
    from eval.break_anatomy import RENDERERS

    return dict(RENDERERS)


TABLES |= _anatomy_tables()  # issue 35: how the purifier rows lose their points (break-anatomy)
_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(^<!-- /table:(?P=name) -->)", re.S | re.M)


def demo_time() -> str:
    """The README's sentence on how long ``make demo`` takes (``docs/figures/demo_bench.json``: the runs' wall and
    CPU seconds and the load before each)."""
    rec = _json(FIGURES / "demo_bench.json")
    walls = sorted(r["wall_seconds"] for r in rec["runs"])
    cpus = sorted(r["cpu_seconds"] for r in rec["runs"])
    loads = sorted(r["load_before"] for r in rec["runs"])
    median = walls[len(walls) // 2]
    return (f"It took {median:.0f} s (median of {len(walls)} runs, {walls[0]:.0f}-{walls[-1]:.0f} s; "
            f"{cpus[0]:.0f}-{cpus[-1]:.0f} s of CPU) on this 2-core CPU, {rec['machine']} (load average "
            f"{loads[0]:.1f}-{loads[-1]:.1f} before each run; measured {rec['date']}).")  # fmt: skip


TABLES["demo-time"] = demo_time


def pages() -> list[Path]:
    """Every page with generated tables: the README and ``docs/*.md``."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(name: str) -> str:
    """The Markdown of table ``name`` (``KeyError`` for an unknown one)."""
    return TABLES[name]()


def render_page(text: str) -> str:
    """``text`` with every marked table block rewritten from its JSON."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + "\n" + m.group(4), text)


def stale_blocks(text: str) -> list[str]:
    """Names of the marked blocks of ``text`` that differ from what their JSON renders."""
    return [m.group("name") for m in _BLOCK.finditer(text) if m.group("body") != render(m.group("name")) + "\n"]
