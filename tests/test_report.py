"""The report: figures on disk, one self-contained HTML page, and that page in a real browser."""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from langneurons.neurons import GENERAL, RELATED, SPECIFIC, UNASSIGNED, NeuronMap
from langneurons.runs import RunDir
from langneurons.stats import ActivationStats
from ci import skip_or_fail

LANGS = ["en", "de", "zh", "ru"]
FIGURES = ["layer_classes", "appear", "language_heatmap", "overlap", "example_neuron", "lambda_sweep"]
BASE_SECTIONS = ["manifest", "summary", "identification", "anatomy"]


def make_run(d: Path, L: int = 16, N: int = 64, seed: int = 0, method: str = "entropy-lambda",
             ablation: bool = True) -> tuple[ActivationStats, NeuronMap]:
    """A synthetic run directory: stats with four planted layer phases, a neuron map derived from
    them the way identification does (τ quantile, entropy score, top-rate selection, classes from
    the active-language count), and optionally an ablation.parquet."""
    g = torch.Generator().manual_seed(seed)
    K = len(LANGS)
    edges = [0, L // 4, L // 2, 3 * L // 4, L]
    lang_rate, gen_rate = [0.12, 0.02, 0.10, 0.04], [0.02, 0.12, 0.03, 0.15]
    p = torch.rand(K, L, N, generator=g) * 0.3
    for ph in range(4):
        for layer in range(edges[ph], edges[ph + 1]):
            idx = torch.randperm(N, generator=g).tolist()
            nl, ng = int(lang_rate[ph] * N), int(gen_rate[ph] * N)
            for n in idx[:nl]:
                ks = torch.randperm(K, generator=g)[:int(torch.randint(1, K, (1,), generator=g))]
                p[ks, layer, n] = 0.75 + 0.25 * torch.rand(len(ks), generator=g)
            for n in idx[nl:nl + ng]:
                p[:, layer, n] = 0.75 + 0.25 * torch.rand(K, generator=g)
    tokens = torch.tensor([5000, 6000, 4000, 5500])
    stats = ActivationStats(LANGS, (p * tokens.view(-1, 1, 1)).round().to(torch.int64), tokens, None, {})
    stats.save(d, extra_manifest={
        "model": {"model": "synthetic/tiny-llama", "architecture": "llama", "family": "gated",
                  "hook_point": "mlp.act_fn", "num_layers": L, "num_neurons": N, "dtype": "float32",
                  "model_fingerprint": "abc123"},
        "stages": {"record": {"key": "synthetic", "inputs": {}, "outputs": {},
                              "result": {"scope": "all", "include_special": False, "corpus": "synthetic-corpus",
                                         "tokens": dict(zip(LANGS, tokens.tolist()))}}},
        "versions": {"langneurons": "0.1.0", "torch": torch.__version__}})
    pr = stats.probs()
    tau = float(torch.quantile(pr.flatten(), 0.95))
    active = pr > tau
    n_act = active.sum(0)
    q = pr / pr.sum(0).clamp(min=1e-12)
    scores = (-(q * q.clamp(min=1e-12).log()).sum(0) / np.log(K) - 0.1 * pr.max(0).values).float()
    selected = torch.zeros(L * N, dtype=torch.bool)
    selected[torch.argsort(scores.flatten())[:int(0.05 * L * N)]] = True
    selected = selected.view(L, N)
    classes = torch.zeros(L, N, dtype=torch.int8)
    classes[selected & (n_act == 1)] = SPECIFIC
    classes[selected & (n_act >= 2) & (n_act < K)] = RELATED
    classes[n_act == K] = GENERAL
    classes[selected & (n_act == 0)] = UNASSIGNED
    active = active & (selected | (n_act == K)).unsqueeze(0)
    lam = method == "entropy-lambda"
    meta = {"method": method, "params": {"top_rate": 0.05, "bar": 0.95, "lam": "auto" if lam else None,
                                         "lam_range": [0.0, 0.2], "eps": 1e-3},
            "tau": tau, "lambda": 0.1 if lam else None,
            "lambda_trace": [{"lambda": 0.0, "appear_K": 0, "passes": True},
                             {"lambda": 0.2, "appear_K": 5, "passes": False},
                             {"lambda": 0.1, "appear_K": 0, "passes": True},
                             {"lambda": 0.15, "appear_K": 2, "passes": False}] if lam else [],
            "lambda_saturated": False, "model": "synthetic/tiny-llama", "scope": "all",
            "num_selected": int(selected.sum())}
    nmap = NeuronMap(LANGS, classes, active, selected, scores, meta)
    nmap.save(RunDir(d).neurons_path)
    if ablation:
        rows = []
        for i, a in enumerate(LANGS):
            for j, b in enumerate(LANGS):
                for nset in ("specific", "random:specific"):
                    base = 2.0 + 0.1 * j
                    delta = (0.5 if i == j else 0.05) * (0.1 if nset.startswith("random") else 1.0)
                    rows.append({"deactivated_lang": a, "eval_lang": b, "neuron_set": nset, "metric": "nll",
                                 "base": base, "ablated": base + delta, "delta": delta, "n_tokens": 100})
        pd.DataFrame(rows).to_parquet(RunDir(d).ablation_path)
    return stats, nmap


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from langneurons.report import build_report

    d = tmp_path_factory.mktemp("run")
    stats, nmap = make_run(d)
    path = build_report(d)
    return d, path, stats, nmap


class _Collector(html.parser.HTMLParser):
    """Collects <img> attributes, element ids and the text/cell rows of every table per section."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.ids: list[str] = []
        self.section: str | None = None
        self.tables: dict[str, list[list[list[str]]]] = {}
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.section = a.get("id")
            self.tables.setdefault(self.section, [])
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self.section][-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


# -- figures ---------------------------------------------------------------------------------------
def test_every_figure_is_written_as_png_and_svg(built):
    d, _, _, _ = built
    for name in FIGURES:
        png, svg = RunDir(d).figures_dir / f"{name}.png", RunDir(d).figures_dir / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        text = svg.read_text()
        assert "<svg" in text and svg.stat().st_size > 5000, name


# -- the HTML page ------------------------------------------------------------------------------------
def test_html_is_self_contained_with_every_section(built):
    d, path, stats, nmap = built
    assert path == RunDir(d).report_path
    text = path.read_text(encoding="utf-8")
    doc = parse(text)
    for name in BASE_SECTIONS + ["interventions"]:
        assert f"section-{name}" in doc.ids, name
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in doc.links)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    assert len(doc.imgs) >= len(FIGURES)  # the interventions section may add its own figures
    for img in doc.imgs:
        assert img.get("alt", "").strip()
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the embedded images are files on disk, and every figure of ours is embedded
    embedded = {base64.b64decode(i["src"].split(",", 1)[1]) for i in doc.imgs}
    assert {(RunDir(d).figures_dir / f"{n}.png").read_bytes() for n in FIGURES} <= embedded
    assert embedded <= {f.read_bytes() for f in RunDir(d).figures_dir.glob("*.png")}
    for n in FIGURES:
        assert f"figure-{n}" in doc.ids
    manifest = RunDir(d).read_manifest()
    assert manifest["stages"]["report"]["result"]["sections"] == [f"section-{s}" for s in BASE_SECTIONS + ["interventions"]]
    assert (RunDir(d).anatomy_path).is_file()  # computed because it was missing


def test_html_tables_carry_the_run_numbers(built):
    d, path, stats, nmap = built
    doc = parse(path.read_text(encoding="utf-8"))
    facts = {r[0]: r[1] for t in doc.tables["section-manifest"] for r in t if len(r) == 2}
    assert facts["model"] == "synthetic/tiny-llama"
    assert facts["τ (activity threshold)"] == f"{nmap.meta['tau']:.6g}"
    assert facts["λ"].startswith("0.1 ") and "not saturated" in facts["λ"]
    assert facts["top_rate (selected share)"] == "0.05" and facts["bar (τ quantile)"] == "0.95"
    assert "torch" in facts["versions"] and facts["corpus"] == "synthetic-corpus"
    tokens = {r[0]: r[1] for t in doc.tables["section-manifest"] for r in t if r and r[0] in LANGS}
    assert tokens == {lang: f"{n:,}" for lang, n in zip(LANGS, stats.tokens.tolist())}
    # summary table vs a direct count on the map
    rows = {r[0]: r[1:] for r in doc.tables["section-summary"][0] if r[0] in LANGS}
    for k, lang in enumerate(LANGS):
        spec = int(((nmap.classes == SPECIFIC) & nmap.active[k]).sum())
        rel = int(((nmap.classes == RELATED) & nmap.active[k]).sum())
        gen = int((nmap.classes == GENERAL).sum())
        assert rows[lang] == [f"{spec:,}", f"{rel:,}", f"{spec + rel:,}", f"{gen:,}"]
    unassigned = int((nmap.classes == UNASSIGNED).sum())
    text = path.read_text(encoding="utf-8")
    assert f"{unassigned:,} ({unassigned / int(nmap.selected.sum()):.1%} of the selection)" in text
    # phase table matches anatomy.json
    an = json.loads(RunDir(d).anatomy_path.read_text())
    phase_rows = [r for r in doc.tables["section-anatomy"][0][1:]]
    assert [r[1] for r in phase_rows] == [p["name"] for p in an["phases"]]
    assert [r[2] for r in phase_rows] == [f"{p['start']}–{p['end']}" for p in an["phases"]]
    # the interventions section shows each language's own ΔNLL (the diagonal of ablation.parquet)
    df = pd.read_parquet(RunDir(d).ablation_path)
    diag = df[(df.metric == "nll") & (df.neuron_set == "specific") & (df.deactivated_lang == df.eval_lang)]
    own = {}
    for t in doc.tables["section-interventions"]:
        if t and "ΔNLL own" in t[0] and t[0][0] == "deactivated":
            col = t[0].index("ΔNLL own")
            own = {r[0]: r[col] for r in t[1:] if r and r[0] in LANGS}
            break
    assert diag.shape[0] and own
    for r in diag.itertuples():
        if r.deactivated_lang in own:
            assert own[r.deactivated_lang] == f"{r.delta:+.4f}", (r.deactivated_lang, own)


def test_plain_ablation_tables_match_the_parquet(built):
    from langneurons.report.html import _ablation_tables

    d, _, _, _ = built
    frag = _ablation_tables(RunDir(d).ablation_path)
    doc = parse("<section id='x'>" + frag + "</section>")
    df = pd.read_parquet(RunDir(d).ablation_path)
    assert len(doc.tables["x"]) == 2  # nll x {specific, random:specific}
    header, *rows = doc.tables["x"][0]
    sub = df[(df.metric == "nll") & (df.neuron_set == "random:specific")]  # sorted: "random:..." < "specific"
    for r in rows:
        for lang, cell in zip(header[1:], r[1:]):
            want = float(sub[(sub.deactivated_lang == r[0]) & (sub.eval_lang == lang)].delta.iloc[0])
            assert float(cell) == pytest.approx(want, rel=1e-3)


def test_sections_plug_in_without_editing_html(tmp_path, monkeypatch):
    from langneurons.report import build_report, register_section
    from langneurons.report.sections import unregister_section

    make_run(tmp_path, L=8, N=32, method="lape", ablation=False)
    shutil.rmtree(RunDir(tmp_path).stats_dir)  # no stats: the example neuron is skipped with a note
    register_section("plugin-demo", "Plug-in demo", lambda run_dir: "<p id='conf-body'>stable</p>"
                     if (Path(run_dir) / "neurons.safetensors").exists() else None, order=60)
    register_section("nothing", "Nothing here", lambda run_dir: None, order=61)
    register_section("broken", "Broken", lambda run_dir: 1 / 0, order=62)
    try:
        with pytest.raises(ZeroDivisionError):  # the test suite's strict mode: a crashing renderer fails
            build_report(tmp_path)
        monkeypatch.setenv("LANGNEURONS_STRICT_REPORT", "0")  # a user's report: an error note instead
        text = build_report(tmp_path).read_text(encoding="utf-8")
    finally:
        for name in ("plugin-demo", "nothing", "broken"):
            unregister_section(name)
    doc = parse(text)
    assert "section-plugin-demo" in doc.ids and "conf-body" in doc.ids
    assert "section-nothing" not in doc.ids and "section-interventions" not in doc.ids
    assert "section-broken" in doc.ids and "ZeroDivisionError" in text
    assert "has no λ" in text and "activation statistics are not available" in text
    assert len(doc.imgs) == len(FIGURES) - 2
    assert "not reliable" in text and "forced" in text  # 8 layers = 4 phases x 2 layers: only one split


def test_report_refuses_an_empty_directory(tmp_path):
    from langneurons.errors import LangNeuronsError
    from langneurons.report import build_report

    with pytest.raises(LangNeuronsError, match="identify"):
        build_report(tmp_path)


def test_cli_report_prints_the_path(tmp_path, capsys):
    from langneurons.cli import main

    make_run(tmp_path, L=8, N=32, ablation=False)
    main(["report", str(tmp_path), "--pivot", "de"])
    out = capsys.readouterr().out.strip()
    assert out == str(RunDir(tmp_path).report_path)
    assert json.loads(RunDir(tmp_path).anatomy_path.read_text())["pivot"]["lang"] == "de"


# -- in a real browser ----------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


PROBE = """<script>
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (img) {
    img.setAttribute('data-ok', (img.complete && img.naturalWidth > 0) ? '1' : '0');
    img.setAttribute('data-nw', String(img.naturalWidth));
    img.setAttribute('data-h', String(Math.round(img.getBoundingClientRect().height)));
  });
  document.querySelectorAll('section').forEach(function (s) {
    s.setAttribute('data-h', String(Math.round(s.getBoundingClientRect().height)));
    s.setAttribute('data-len', String(s.innerText.trim().length));
  });
  document.body.setAttribute('data-probed', '1');
});
</script>"""


def test_report_renders_in_headless_chromium(built, tmp_path):
    browser = _chromium()
    if browser is None:
        skip_or_fail("Chromium is not installed (apt-get install chromium); the browser check needs it")
    d, path, _, _ = built
    probe_page = tmp_path / "probe.html"  # the report itself stays script-free
    probe_page.write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1280,2400"]

    def run(extra: list[str], page: Path, profile: str) -> subprocess.CompletedProcess:
        return subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / profile}", *extra, page.as_uri()],
                              capture_output=True, text=True, timeout=90)

    dom = run(["--virtual-time-budget=5000", "--dump-dom"], probe_page, "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    doc = parse(dom.stdout)
    assert 'data-probed="1"' in dom.stdout, "the load event never fired"
    for name in BASE_SECTIONS + ["interventions"]:
        assert f"section-{name}" in doc.ids
    sections = re.findall(r'<section id="section-([\w-]+)"[^>]*data-h="(\d+)"[^>]*data-len="(\d+)"', dom.stdout)
    assert {s for s, _, _ in sections} >= set(BASE_SECTIONS)
    assert all(int(h) > 50 and int(n) > 20 for _, h, n in sections), sections
    assert len(doc.imgs) >= len(FIGURES)
    for img in doc.imgs:
        assert img.get("data-ok") == "1", f"broken image: {img.get('alt')}"
        assert int(img["data-nw"]) > 100 and int(img["data-h"]) > 50
        assert img.get("alt", "").strip()

    shot = tmp_path / "report.png"
    res = run([f"--screenshot={shot}"], path, "profile-shot")
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    if os.environ.get("LANGNEURONS_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["LANGNEURONS_KEEP_SCREENSHOT"])


def test_report_of_a_map_from_identify(tmp_path):
    """Integration with the real identification (its meta keys feed the λ figure and run table)."""
    import langneurons.identify as identify_mod  # the project's own module: never a skip
    from langneurons.report import build_report

    stats, _ = make_run(tmp_path, L=12, N=48, ablation=False)
    nmap = identify_mod.identify(stats, "entropy-lambda", top_rate=0.05)
    nmap.save(RunDir(tmp_path).neurons_path)
    text = build_report(tmp_path).read_text(encoding="utf-8")
    doc = parse(text)
    assert "figure-lambda_sweep" in doc.ids and "figure-example_neuron" in doc.ids
    facts = {r[0]: r[1] for t in doc.tables["section-manifest"] for r in t if len(r) == 2}
    assert facts["λ"].startswith(f"{nmap.meta['lambda']:.4g} (automatic")
    assert ("not saturated" in facts["λ"]) != bool(nmap.meta.get("lambda_saturated"))
    an = json.loads(RunDir(tmp_path).anatomy_path.read_text())
    assert an["appear"] == nmap.appear() and an["selected"] == int(nmap.selected.sum())
