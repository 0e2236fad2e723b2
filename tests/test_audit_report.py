"""The round report: mentions coloured by their reward (checked in the HTML and in a real browser's
screenshot), figures as PNGs."""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fisao.audit.html import NEGATIVE, POSITIVE, headline_rows, render_report, reward_colour
from fisao.audit.plots import metric_curves_png, reward_histogram_png
from fisao.audit.report import histogram_caption

ROWS = [
    {"row": 0, "image_id": 7, "answer_reward": 0.0, "text": "a red circle and a blue square <b>",
     "mentions": [{"text": "circle", "category": "circle", "start": 6, "end": 12, "score": 0.31, "reward": 1.0,
                   "hallucinated": False},
                  {"text": "square", "category": "square", "start": 24, "end": 30, "score": 0.12, "reward": -1.0,
                   "hallucinated": True}]},
    {"row": 3, "image_id": 9, "answer_reward": 0.25, "text": "one star", "mentions": [
        {"text": "star", "category": "star", "start": 4, "end": 8, "score": 0.2, "reward": 0.25, "hallucinated": False}]},
]
ROUNDS = [{"chair_i": 0.3, "recall": 0.6}, {"chair_i": 0.25, "recall": 0.58, "score/reward_mean": 0.1, "update/kl": 0.02}]


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self.images, self._open = [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "mention" in attrs.get("class", ""):
            self._open = {**attrs, "text": ""}
        if tag == "sub" and self._open is not None:
            self._open["closed_text"] = True  # the reward label after the mention's own text
        if tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_data(self, data):
        if self._open is not None and not self._open.get("closed_text"):
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


@pytest.fixture
def page(tmp_path):
    reward_histogram_png([1.0, -1.0, 0.25, -0.5], [False, True, False, True], tmp_path / "rewards.png")
    metric_curves_png(ROUNDS, tmp_path / "curves.png")
    html = render_report("demo round 1", {"model sha256": "abc"}, ROUNDS[-1], ROWS,
                         {"mention rewards": tmp_path / "rewards.png", "metrics": tmp_path / "curves.png"},
                         base=ROUNDS[0], captions={"mention rewards": histogram_caption("first")})
    path = tmp_path / "report.html"
    path.write_text(html)
    return path


def test_each_mention_is_coloured_by_its_reward(page):
    parser = Spans()
    parser.feed(page.read_text())
    got = [(s["text"], s["data-reward"], s["style"].split(";")[0], "hallucinated" in s["class"]) for s in parser.spans]
    assert got == [("circle", "1.00000", f"background:{reward_colour(1.0)}", False),
                   ("square", "-1.00000", f"background:{reward_colour(-1.0)}", True),
                   ("star", "0.25000", f"background:{reward_colour(0.25)}", False)]
    assert reward_colour(1.0) == "#%02x%02x%02x" % POSITIVE and reward_colour(-1.0) == "#%02x%02x%02x" % NEGATIVE
    assert reward_colour(0.0) == "#ffffff"
    assert "&lt;b&gt;" in page.read_text()  # answer text is escaped, never markup
    assert parser.images == 2


def test_report_puts_the_picture_first_and_provenance_last(page):
    text = page.read_text()
    order = [text.index(mark) for mark in ("CHAIR_i (lower is better)", "<figure>", "<h2>rollouts</h2>",
                                           "<h2>all metrics of this round</h2>", "<h2>provenance</h2>")]
    assert order == sorted(order)
    provenance = text[text.index("<h2>provenance</h2>"):]
    assert "<thead>" not in provenance and "<td>model sha256</td><td>abc</td>" in provenance  # no empty header row
    # The headline: base model, this round, change.
    assert "<td>CHAIR_i (lower is better)</td><td>0.3000</td><td>0.2500</td><td>-0.0500</td>" in text
    assert "<figcaption>" in text and "spike at 0" in text  # the histogram's caption explains the repeat rule
    assert "a correct repeat shows +0.00" in text  # and so does the legend


def test_headline_rows_follow_the_benchmarks_order_and_skip_what_is_missing():
    rows = headline_rows({"recall": 0.5, "chair_i": 0.2, "pope_adversarial_f1": 0.75, "update/kl": 1.0},
                         {"recall": 0.6, "chair_i": 0.25})
    assert rows == [["CHAIR_i (lower is better)", 0.25, 0.2, "-0.0500"], ["recall", 0.6, 0.5, "-0.1000"],
                    ["POPE adversarial F1", None, 0.75, None]]
    assert headline_rows({"chair_i": 0.2}, None) == [["CHAIR_i (lower is better)", None, 0.2, None]]


def test_the_repeat_rule_is_explained_as_configured():
    assert "spike at 0" in histogram_caption("first") and "spike" not in histogram_caption("each")
    page = render_report("t", {}, {"chair_i": 0.1}, ROWS, {}, repeats="each")
    assert "every mention keeps its own reward" in page and "a correct repeat shows" not in page
    with pytest.raises(ValueError, match="repeats must be one of"):
        render_report("t", {}, {}, ROWS, {}, repeats="last")


def _where(path, rgb: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: the pixels of the PNG at `path` drawn exactly in colour `rgb`."""
    return np.all(np.asarray(Image.open(path).convert("RGB")) == rgb, axis=-1)


TAB_GREEN, TAB_RED, TAB_BLUE = (44, 160, 44), (214, 39, 40), (31, 119, 180)


def test_reward_histogram_stacks_hallucinated_on_correct_at_each_reward(tmp_path):
    # One correct and one hallucinated mention at +0.5, one hallucinated at -0.5.
    path = reward_histogram_png([0.5, 0.5, -0.5], [False, True, True], tmp_path / "h.png")
    green, red = _where(path, TAB_GREEN), _where(path, TAB_RED)
    bars = lambda mask: np.nonzero(mask.sum(0) > 20)[0]  # columns of bars (the legend's patches are a few pixels)
    left = bars(red)[bars(red) < bars(green).min()]
    right = bars(green)
    assert len(left) and len(right) and left.max() < right.min()  # -0.5 left of +0.5
    assert abs(len(left) - len(right)) <= 1  # one bin wide each
    assert not green[:, left].any()  # no correct mention at -0.5
    height = lambda mask, cols: int(np.median(mask[:, cols].sum(0)))
    assert abs(height(red, left) - height(red, right)) <= 1 and abs(height(green, right) - height(red, right)) <= 1
    col = right[len(right) // 2]  # at +0.5 the hallucinated mention sits on top of the correct one
    assert np.nonzero(red[:, col])[0].max() < np.nonzero(green[:, col])[0].min()


def test_metric_curves_draw_each_metric_in_its_panel(tmp_path):
    path = metric_curves_png([{"chair_i": 0.3, "recall": 0.5}, {"chair_i": 0.2, "recall": 0.7}], tmp_path / "c.png")
    blue = _where(path, TAB_BLUE)
    h, w = blue.shape
    panels = [blue[r * h // 2:(r + 1) * h // 2, c * w // 3:(c + 1) * w // 3] for r in range(2) for c in range(3)]
    # Panels in the order of CURVES: chair_i, chair_s, recall / POPE adv. F1, mean reward, KL.
    assert [bool(p.any()) for p in panels] == [True, False, True, False, False, False]

    def rise(panel: np.ndarray) -> float:
        """Pixels the line climbs from its left end to its right end (image rows grow downwards)."""
        ys, xs = np.nonzero(panel)
        return ys[xs <= xs.min() + 4].mean() - ys[xs >= xs.max() - 4].mean()

    assert rise(panels[0]) < -50 and rise(panels[2]) > 50  # CHAIR_i falls, recall rises


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(page, tmp_path):
    """A real browser draws both reward colours and the embedded figures (CI installs Debian's chromium)."""
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI: .ci/run installs it with apt-get")
        pytest.skip("no chromium here (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", f"--screenshot={shot}",
                          "--window-size=1000,2200", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)

    def count(rgb) -> int:
        return int((pixels == np.array(rgb)).all(axis=1).sum())

    assert count(POSITIVE) > 300 and count(NEGATIVE) > 300  # the +1 and -1 mentions' backgrounds
    assert count((44, 160, 44)) > 20 and count((214, 39, 40)) > 20  # matplotlib's tab:green/tab:red bars
