"""The audit's outputs: leakage and utility tables, a leakage-vs-accuracy plot, and a report.

``write_audit`` writes into one folder:

- ``audit.json``: every number (per defence, attack and training point);
- ``leakage.md``: attack x defence, ROUGE-L F1 and token accuracy on the private text;
- ``utility.md``: held-out score of each audited run, against the undefended run;
- ``leakage_vs_accuracy.png``: the best attack's ROUGE-L F1 against held-out accuracy;
- ``report.md``: the whole story in plain words, for a data owner's privacy officer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import atomic_path, atomic_write
from ..privacy import PrivacySettings
from ..report import machine, pyplot
from .settings import AuditConfig

BASELINES = ("baseline: most frequent token", "baseline: unigram sampling")


def attack_names(results: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in results:
        for name in r["leakage"]:
            if name not in seen:
                seen.append(name)
    return [n for n in seen if n in BASELINES] + [n for n in seen if n not in BASELINES]


def best_attack(r: dict) -> tuple[str, float]:
    """The attack that got back the most private text (ROUGE-L F1) in this run."""
    scored = [(name, v["overall"]["rougeL_f1"]) for name, v in r["leakage"].items() if name not in BASELINES]
    return max(scored, key=lambda x: x[1]) if scored else ("-", 0.0)


def best_label(r: dict) -> tuple[float, float] | None:
    """(accuracy, majority-class rate on the same examples) of the label inference that beats
    the majority guess by most; None where the task has no labels."""
    scored = [(v["accuracy"], v.get("majority_baseline", 0.0)) for v in r["labels"].values()]
    return max(scored, key=lambda x: x[0] - x[1]) if scored else None


def label_leak(r: dict) -> float:
    """How far the best label inference beats guessing the majority class (0 if it does not,
    or where the task has no labels)."""
    best = best_label(r)
    return max(0.0, best[0] - best[1]) if best else 0.0


def leak_rank(r: dict) -> tuple[float, float]:
    """Less is better: the best text attack's ROUGE-L F1 (to 0.01), then label inference."""
    return round(best_attack(r)[1], 2), round(label_leak(r), 3)


def utility(r: dict) -> float:
    m = r["utility"]
    return m["accuracy"] if "accuracy" in m else m.get("rougeL", float("nan"))


def utility_name(results: list[dict]) -> str:
    return "accuracy" if results and "accuracy" in results[0]["utility"] else "ROUGE-L"


def recommend(results: list[dict], audit: AuditConfig) -> dict:
    """The defence to ship: the most accurate one meeting the leakage target within the
    utility budget; if none does, the least leaky one within the budget (text leakage first,
    then label inference; target not met)."""
    ref = next((r for r in results if r["name"] == audit.reference), None)
    if ref is None or utility_name(results) != "accuracy":
        return {"name": None, "met": False, "why": f"no '{audit.reference}' run with an accuracy to compare with"}
    budget = utility(ref) - audit.max_accuracy_drop / 100
    candidates = [r for r in results if r["config"]["split"]["head_blocks"] >= 1]  # a = 0 is never shippable
    within = [r for r in candidates if utility(r) >= budget - 1e-12]
    meeting = [r for r in within if best_attack(r)[1] <= audit.target_rougeL]
    if meeting:
        pick = max(meeting, key=lambda r: (utility(r), -best_attack(r)[1]))
        return {"name": pick["name"], "met": True,
                "why": f"the most accurate defence whose best attack stays at or below ROUGE-L F1 "
                       f"{audit.target_rougeL:.2f} within {audit.max_accuracy_drop:g} points of '{ref['name']}'"}
    if within:
        pick = min(within, key=lambda r: (*leak_rank(r), -utility(r)))
        return {"name": pick["name"], "met": False,
                "why": f"no defence reached ROUGE-L F1 <= {audit.target_rougeL:.2f} within "
                       f"{audit.max_accuracy_drop:g} points; this is the least leaky one within the budget"}
    return {"name": ref["name"], "met": False, "why": "no defence stayed within the utility budget"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(v: dict | None) -> str:
    if v is None:
        return "—"
    return f"{v['overall']['rougeL_f1']:.2f} / {_pct(v['overall']['token_accuracy'])}"


def leakage_table(results: list[dict]) -> list[str]:
    names = attack_names(results)
    lines = ["| defence | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r["leakage"].get(n)) for n in names) + " |")
    return lines


def label_table(results: list[dict]) -> list[str]:
    names = sorted({n for r in results for n in r["labels"]})
    if not names:
        return []
    lines = ["| defence | majority-class baseline | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in results:
        base = next(iter(r["labels"].values()), {}).get("majority_baseline")
        cells = [_pct(r["labels"][n]["accuracy"]) if n in r["labels"] else "—" for n in names]
        lines.append(f"| {r['name']} | {_pct(base) if base is not None else '—'} | " + " | ".join(cells) + " |")
    return lines


def _eps(x: float) -> str:
    if math.isinf(x):
        return "∞ (no guarantee)"
    return f"{x:.3g}"


def utility_table(results: list[dict], audit: AuditConfig) -> list[str]:
    ref = next((r for r in results if r["name"] == audit.reference), None)
    uname = utility_name(results)
    lines = [f"| defence | settings | held-out {uname} | vs '{audit.reference}' | best attack (ROUGE-L F1) | "
             "epsilon per example (delta) | train time |", "|---|---|---|---|---|---|---|"]
    for r in results:
        u = utility(r)
        delta = f"{100 * (u - utility(ref)):+.1f} points" if ref is not None else "—"
        name, rl = best_attack(r)
        eps = r["epsilon"]
        lines.append(f"| {r['name']} | {settings_text(r)} | {u:.3f} | {delta} | {rl:.2f} ({name}) | "
                     f"{_eps(eps['both'])} ({eps['delta']:g}) | {r['train_seconds']:.0f} s |")
    return lines


def settings_text(r: dict) -> str:
    c = r["config"]
    defences = PrivacySettings(**c["privacy"])
    return f"a={c['split']['head_blocks']}" + (f", {defences.describe()}" if defences.active else "")


def points_table(results: list[dict]) -> list[str]:
    lines = ["| defence | attack | " + " | ".join(["start", "middle", "end"]) + " |", "|---|---|---|---|---|"]
    for r in results:
        for name, v in r["leakage"].items():
            if name in BASELINES:
                continue
            cells = [f"{v['points'][p]['rougeL_f1']:.2f}" if p in v["points"] else "—"
                     for p in ("start", "middle", "end")]
            lines.append(f"| {r['name']} | {name} | " + " | ".join(cells) + " |")
    return lines


def plot(results: list[dict], audit: AuditConfig, path: Path, recommended: str | None = None) -> None:
    plt = pyplot()
    if plt is None:  # matplotlib is an extra: logged once, no plot
        return

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(results, 1):  # numbered points, names in the legend: clusters stay readable
        x, y = best_attack(r)[1], utility(r)
        chosen = r["name"] == recommended
        color = "tab:red" if r["config"]["split"]["head_blocks"] == 0 else "tab:orange" if chosen else "tab:blue"
        ax.scatter([x], [y], color=color, marker="*" if chosen else "o", s=80 if chosen else 18,
                   label=f"{i}: {r['name']}" + (" (recommended)" if chosen else ""))
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, 3 + 7 * (i % 3)), fontsize=7)
    ref = next((r for r in results if r["name"] == audit.reference), None)
    if ref is not None and utility_name(results) == "accuracy":
        ax.axhline(utility(ref) - audit.max_accuracy_drop / 100, color="grey", ls="--", lw=0.8,
                   label=f"{audit.max_accuracy_drop:g} points below '{audit.reference}'")
    ax.axvline(audit.target_rougeL, color="green", ls="--", lw=0.8, label=f"target ROUGE-L {audit.target_rougeL:.2f}")
    ax.set_xlim(-0.02, 1.05)
    ax.set_xlabel("leakage: best attack's ROUGE-L F1 on the private text")
    ax.set_ylabel(f"held-out {utility_name(results)}")
    ax.set_title("What the server can rebuild vs what the model learns")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_audit(results: list[dict], audit: AuditConfig, out: Path, command: str, seconds: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rec = recommend(results, audit)
    untimed = sum("seconds" not in r for r in results)
    took = (f"{seconds / 60:.0f} min in all" if not untimed else
            f"{seconds / 60:.0f} min in all, not counting model loading and evaluation for {untimed} defence(s) "
            f"stored by an earlier version that timed only training and attacks")
    header = [f"Machine: {machine()}. Command: `{command}` ({took}).", ""]
    atomic_write(out / "leakage.md", "\n".join(
        ["# Leakage: what the trunk server rebuilt of the private text", ""] + header +
        ["Each cell: ROUGE-L F1 / token accuracy on the private positions (record fields and target; "
         "the task's template excluded), over every recorded batch.", ""] + leakage_table(results) +
        ["", "Label inference from `dL/dh2` (share of labels guessed right):", ""] + label_table(results) + [""]))
    atomic_write(out / "utility.md", "\n".join(
        ["# Utility of the audited runs", ""] + header + utility_table(results, audit) + [""]))
    plot(results, audit, out / "leakage_vs_accuracy.png", rec["name"])
    atomic_write(out / "report.md", officer_report(results, audit, rec, header))
    atomic_write(out / "audit.json", json.dumps({"machine": machine(), "command": command, "seconds": seconds,
                                                 "recommendation": rec, "results": results}, indent=1))
    return rec


def _points(r: dict, ref: dict | None) -> str:
    return f" ({100 * (utility(r) - utility(ref)):+.1f} points)" if ref is not None else ""


def summary(results: list[dict], audit: AuditConfig, rec: dict) -> list[str]:
    """The findings in a few plain sentences, from the measured numbers."""
    ref = next((r for r in results if r["name"] == audit.reference), None)
    u = utility_name(results)
    lines = []
    if ref is not None:
        name, rl = best_attack(ref)
        tok = ref["leakage"][name]["overall"]["token_accuracy"] if name in ref["leakage"] else 0.0
        lines.append(f"- Without a defence ('{ref['name']}', {settings_text(ref)}) the server's best attack "
                     f"({name}) rebuilds {_pct(tok)} of the private tokens (ROUGE-L F1 {rl:.2f}).")
    shippable = [r for r in results if r["config"]["split"]["head_blocks"] >= 1]
    if shippable:
        least = min(shippable, key=lambda r: (best_attack(r)[1], -utility(r)))
        lines.append(f"- The least text leakage measured: '{least['name']}' ({settings_text(least)}), best attack "
                     f"ROUGE-L F1 {best_attack(least)[1]:.2f}, at {u} {utility(least):.3f}{_points(least, ref)}.")
    if ref is not None and ref["labels"]:
        acc, base = best_label(ref)
        chosen = next((r for r in results if r["name"] == rec["name"]), None)
        line = (f"- From the returned gradients the server infers {_pct(acc)} of the labels without a defence "
                f"(guessing the majority class gets {_pct(base)} of the same labels)")
        if chosen is not None and chosen is not ref:
            acc, base = best_label(chosen)
            line += f"; with '{chosen['name']}', {_pct(acc)} (majority class: {_pct(base)})"
        lines.append(line + ".")
    if rec["name"]:
        lines.append(f"- Recommended: '{rec['name']}'. " + (
            "It meets the target." if rec["met"] else
            f"No setting met the target (best attack ROUGE-L F1 <= {audit.target_rougeL:.2f} within "
            f"{audit.max_accuracy_drop:g} points): the text itself is not protected by any measured setting that "
            "keeps a useful model."))
    return lines


def officer_report(results: list[dict], audit: AuditConfig, rec: dict, header: list[str]) -> str:
    ref = next((r for r in results if r["name"] == audit.reference), None)
    first = results[0]
    plan, cfg = first["plan"], first["config"]
    lines = ["# Privacy audit: what the trunk server can learn of your data", ""] + header + [
        "## In short", ""] + summary(results, audit, rec) + ["",
        "## What was tested", "",
        f"A real federated fine-tuning run of `{cfg['model']}` on `{cfg['data']['task']}` "
        f"({cfg['federation']['clients']} clients, {plan['steps_per_client']} steps each, batch "
        f"{cfg['train']['batch_size']}) was repeated once per defence. A tap on the server's side of the "
        "transport recorded exactly what the server decoded — each client's activations `h1`, the gradients "
        f"`dL/dh2` it sent back, and the adapters it submitted to FedAvg — at the {', '.join(first['points'])} "
        "of training. Then the server was played as an attacker that knows what a real trunk operator knows: "
        "the public pretrained model, the run's configuration including the defence's settings, the averaged "
        "adapters it computed itself, and public text of the same kind as yours (never your own).", "",
        "Leakage is scored on the private part of each sequence only (the record's own text and its label "
        "or target; the task's fixed template is excluded) as token accuracy and ROUGE-L F1 (1.0: the text "
        "comes back word for word; the frequency baselines show what guessing gets for free).", "",
        "## The attacks", "",
        "- **embedding**: reads `h1` as if it were a token embedding (exact when the client keeps only the "
        "embedding, a = 0: the two-part split SiloTune refuses to run).",
        "- **search**: exact token-by-token search with the head's weights: the public pretrained head, and "
        "the aggregated head that clear-text FedAvg gives the server (middle and end points only: before "
        "the first FedAvg round the server holds no aggregate).",
        "- **learned**: a small inversion model trained on public text pushed through the public head under "
        "the same defence.",
        "- **optimisation**: optimises input embeddings through the public head to reproduce `h1`, "
        "starting from the learned model's guess.",
        "- **search+learned**: the exact search with the learned model's top guesses as extra candidates.",
        "- **gradient**: from `dL/dh2`, the label (classification) or target text (generation), by matching "
        "the gradient each guess would produce through the public or aggregated tail.", "",
        "## Results", ""] + utility_table(results, audit) + ["", "Leakage per attack (ROUGE-L F1 / token "
                                                             "accuracy):", ""] + leakage_table(results)
    labels = label_table(results)
    if labels:
        lines += ["", "Labels guessed from the returned gradient:", ""] + labels
    lines += ["", "Leakage by training point (ROUGE-L F1):", ""] + points_table(results)
    lines += ["", "![leakage vs accuracy](leakage_vs_accuracy.png)", "", "## Recommendation", ""]
    if rec["name"]:
        r = next(x for x in results if x["name"] == rec["name"])
        name, rl = best_attack(r)
        lines.append(f"**{rec['name']}** ({settings_text(r)}): {rec['why']}. Its strongest attack ({name}) "
                     f"reaches ROUGE-L F1 {rl:.2f}; held-out {utility_name(results)} {utility(r):.3f}"
                     + (f" vs {utility(ref):.3f} undefended." if ref is not None else "."))
        if not rec["met"]:
            lines.append("")
            lines.append(f"**The target (ROUGE-L F1 <= {audit.target_rougeL:.2f} within "
                         f"{audit.max_accuracy_drop:g} points of accuracy) was not met** by any audited setting.")
    else:
        lines.append(rec["why"])
    lines += ["", "## What protects what", "",
              "- TLS and the per-client AEAD keys protect your traffic from network attackers and from other "
              "clients (a peer with the same head could otherwise invert your activations). They do **not** "
              "protect it from the trunk server, which decrypts `h1` and `dL/dh2` to do its work.",
              "- Against the server, only what leaves your machine counts: more client blocks, clipping and "
              "noise on `h1` and on `dL/dh2`, and (planned) a trusted execution environment on the server.",
              "- Formal (epsilon, delta) figures come from opacus's RDP accountant for the clipped, noised "
              "releases (replace-one adjacency over a whole example); at the noise levels that keep a useful "
              "model they are far too large to mean anything, so the measured attacks above are the evidence.",
              "- The audit measures these attacks on this model and data; a stronger attack may recover more. "
              "Rerun it on your own model and data before relying on a setting."]
    return "\n".join(lines) + "\n"
