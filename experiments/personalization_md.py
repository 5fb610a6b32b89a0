"""The Markdown report of ``personalization.py`` (tables of the measured rows, and what they show)."""

from __future__ import annotations

import numpy as np


def _ms(v: dict) -> str:
  return f"{v['mean']:.3f} ± {v['se']:.3f}"


def _mean(result: dict, key: str, metric: str) -> float:
  vals = []
  for s in result["subjects"].values():
    v = s["rows"][key][metric]
    vals.append(v["mean"] if isinstance(v, dict) else v)
  return float(np.mean(vals))


def markdown(r: dict) -> str:
  s = r["settings"]
  labels = list(r["subjects"])
  fc_keys = [k for k in next(iter(r["subjects"].values()))["rows"] if k.startswith("fastcomposer")]
  lines = [
    "# Personalization on two-digit MNIST scenes: DreamBooth and FastComposer\n",
    f"Command: `{r['command']}`  \nMachine: {r['machine']}, shared with other jobs ({r['uptime']}).\n",
    (
      f"Base: the text-to-image model `{s['base']}` (step {s['base_step']}). Subjects: for each digit "
      f"{', '.join(labels)}, a distinctive held-out MNIST digit (never seen by the base model or FastComposer's "
      "training) and 3 augmented shots of it. DreamBooth fine-tunes the base U-Net on the 4 shots, each in a "
      'two-digit scene captioned with the identifier ("a bwv 4 to the left of a 7"), with prior preservation '
      "(weight 1, 100 class images) or without. FastComposer is trained once on the base's scenes and gets "
      'only the original shot as reference, no fine-tuning; its prompt is the class prompt ("a 4 to the left '
      "of a 7\") with the reference fused into the subject's digit word. "
      f"DDIM-{s['steps']}, guidance {s['guidance']:g}, {s['num']} prompts per subject and set (random other "
      "digit, side and caption template), the same prompts and noise for every model.\n"
    ),
    (
      f"Judge: `{s['judge']}`; each cell's centre goes through it. *Subject fidelity*: cosine "
      "similarity of the subject cell's 128-d judge features to the references' (features centred on the "
      "mean feature of the held-out real digits; mean over references; "
      "mean ± standard error over samples). For scale: other real held-out digits of the subject's class "
      "score the 'a 4 but not this 4' level, the shots among themselves the ceiling.\n"
    ),
    "## Subject fidelity and prompt fidelity (mean over subjects; per subject below)\n",
    "| model | subject fidelity | subject cell is the digit | other cell right | both right, in order |",
    "|---|---|---|---|---|",
    f"| real held-out digits of the class (scale) | {_mean(r, 'real_same_class', 'mean'):.3f} | | | |",
    f"| the 4 shots among themselves (ceiling) | {np.mean([v['rows']['references_among_themselves'] for v in r['subjects'].values()]):.3f} | | | |",
  ]
  order = ["base/subject", "dreambooth_prior/subject", "dreambooth_no_prior/subject", *fc_keys]
  names = {
    "base/subject": 'base model, "a bwv 4 ..."',
    "dreambooth_prior/subject": "DreamBooth + prior preservation",
    "dreambooth_no_prior/subject": "DreamBooth, no prior",
  }
  for k in order:
    name = names.get(
      k,
      k.replace("fastcomposer_", "FastComposer, ")
      .replace("no_loc", "no loc. loss")
      .replace("/delay", ", delay "),
    )
    lines.append(
      f"| {name} | **{_mean(r, k, 'subject_fidelity'):.3f}** | {_mean(r, k, 'subject_acc'):.3f} | "
      f"{_mean(r, k, 'other_acc'):.3f} | {_mean(r, k, 'both'):.3f} |"
    )
  lines += [
    "",
    '## Language drift: class prompts without the identifier ("a 4 to the left of a 7")\n',
    (
      "Likeness to the subject: lower means the class was not overwritten by the subject. Diversity: mean pairwise "
      "cosine distance of the class cells' features.\n"
    ),
    "| model | likeness to the subject | diversity | cell is the class digit | other cell right |",
    "|---|---|---|---|---|",
  ]
  for k, name in (
    ("base/class", "base model"),
    ("dreambooth_prior/class", "DreamBooth + prior"),
    ("dreambooth_no_prior/class", "DreamBooth, no prior"),
  ):
    lines.append(
      f"| {name} | **{_mean(r, k, 'subject_fidelity'):.3f}** | {_mean(r, k, 'diversity'):.3f} | "
      f"{_mean(r, k, 'subject_acc'):.3f} | {_mean(r, k, 'other_acc'):.3f} |"
    )
  p = r["pairs"]
  lines += [
    "",
    f"## Two subjects, FastComposer, {p['num']} prompts from pairs of unseen held-out digits\n",
    (
      '"a 3 to the left of a 5" with both digits\' images as references (different classes). Swapped: both '
      "digits but in reversed order; merged: both cells judged the same digit. Identity margin: cosine of each "
      "cell to its own subject's reference minus to the other subject's.\n"
    ),
    "| model | both right, in order | swapped | merged | own-subject fidelity | identity margin |",
    "|---|---|---|---|---|---|",
  ]
  for k, row in p["rows"].items():
    name = (
      "base model (text only)"
      if k == "base"
      else k.replace("fastcomposer_", "FastComposer, ")
      .replace("no_loc", "no loc. loss")
      .replace("/delay", ", delay ")
    )
    lines.append(
      f"| {name} | **{row['both']:.3f}** | {row['swapped']:.3f} | {row['merged']:.3f} | "
      f"{_ms(row['own_fidelity'])} | {_ms(row['identity_margin'])} |"
    )
  t = r["timings"]
  db = [v for k, v in t.items() if k.startswith("train/dreambooth") and k.endswith("/prior")]
  db0 = [v for k, v in t.items() if k.startswith("train/dreambooth") and k.endswith("no_prior")]
  fc = t["train/fastcomposer/loc"]
  lines += [
    "",
    "## Time per new subject\n",
    "| method | per new subject | once |",
    "|---|---|---|",
    (
      f"| DreamBooth + prior | {np.mean([v['train_s'] for v in db]):.0f} s fine-tuning (incl. compilation) + "
      f"{np.mean([v['class_images_s'] for v in db]):.0f} s class images (once per class) | |"
    ),
    f"| DreamBooth, no prior | {np.mean([v['train_s'] for v in db0]):.0f} s fine-tuning | |",
    (
      f"| FastComposer | {1000 * r['fastcomposer_encode_s']:.1f} ms (one encoder pass) | "
      f"{fc['train_s'] / 60:.0f} min training (with loc. loss; {t['train/fastcomposer/no_loc']['train_s'] / 60:.0f} min without) |"
    ),
    "",
    (
      "Wall clock under the load shown above; the DreamBooth rows and FastComposer's training ran in the same "
      "session, so their ratio is meaningful, their absolute values are inflated."
    ),
    "",
    "## Per subject\n",
  ]
  for label, sub in r["subjects"].items():
    rows = sub["rows"]
    lines.append(f'Subject {label} (held-out index {sub["index"]}), e.g. "{sub["prompts"][0]}":\n')
    lines.append(
      "| model | fidelity (subject prompt) | both right | drift likeness (class prompt) | diversity |"
    )
    lines.append("|---|---|---|---|---|")
    for m in ("base", "dreambooth_prior", "dreambooth_no_prior"):
      a, c = rows[f"{m}/subject"], rows[f"{m}/class"]
      lines.append(
        f"| {m} | {_ms(a['subject_fidelity'])} | {a['both']:.3f} | {_ms(c['subject_fidelity'])} | {c['diversity']:.3f} |"
      )
    for k in fc_keys:
      lines.append(f"| {k} | {_ms(rows[k]['subject_fidelity'])} | {rows[k]['both']:.3f} | | |")
    lines.append(
      f"\nReal held-out digits of class {label}: {_ms(rows['real_same_class'])}; shots among themselves {rows['references_among_themselves']:.3f}.\n"
    )
  lines += [
    (
      'Grids (first row: the subject\'s shots; then 8 scenes each of: base "a bwv ...", DreamBooth +prior, '
      "DreamBooth no prior, then the class prompts for base, +prior, no prior, then FastComposer):"
    ),
    "",
  ]
  lines += [f"- `{g}`" for g in r["grids"]]
  return "\n".join(lines) + "\n"
