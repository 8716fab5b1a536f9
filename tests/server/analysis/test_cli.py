"""``floworacle analyze ...`` end to end through ``floworacle_server.cli.main``: JSON contract keys,
valid PNGs, error exits, and the --server path over a real gRPC channel."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from floworacle_server.analysis import shift_for_share, switch_time
from floworacle_server.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = "0.1,0.3,0.5,0.7,0.9"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) < 300_000
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).ndim == 3


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=40)
    x = (rng.standard_normal((40, 6)) + 2.0 * labels[:, None]).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, x=x, labels=labels)
    return path, x, labels


def _check_entry(e: dict) -> None:
    assert {"name", "N", "D", "t", "curves", "t_switch_50", "t_switch_99"} <= set(e)
    t = np.asarray(e["t"])
    for metric in ("top1", "entropy", "ess", "gap"):
        for stat in ("mean", "std", "q10", "q50", "q90"):
            assert len(e["curves"][metric][stat]) == t.size
    mean = np.asarray(e["curves"]["top1"]["mean"])
    for key, level in (("t_switch_50", 0.5), ("t_switch_99", 0.99)):
        expect = switch_time(t, mean, level)
        assert (e[key] is None and expect is None) or e[key] == pytest.approx(expect)


def test_transition_per_class_json_and_plot(tmp_path: Path, labelled_file, capsys) -> None:
    data, x, labels = labelled_file
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = main(
        ["analyze", "transition", "--data", str(data), "--per-class", "--t-grid", GRID, "--queries-per-t", "8",
         "--json", str(out), "--plot", str(png), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["path"] == "linear" and res["queries_per_t"] == 8
    entries = res["datasets"]
    assert [e["label"] for e in entries] == [None, 0, 1]
    assert entries[0]["N"] == 40 and entries[0]["D"] == 6
    assert [e["N"] for e in entries[1:]] == [int((labels == 0).sum()), int((labels == 1).sum())]
    for e in entries:
        _check_entry(e)
        np.testing.assert_allclose(e["t"], [0.1, 0.3, 0.5, 0.7, 0.9])
    _assert_png(png)
    assert "t_switch_99" in capsys.readouterr().out


def test_synthetic_sweep_and_advice(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(
        ["analyze", "transition", "--synthetic", "50:4", "--synthetic", "50:64", "--t-grid", "linspace:0.05:0.95:10",
         "--queries-per-t", "16", "--json", str(out), "--plot", str(png), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    low, high = res["datasets"]
    assert (low["N"], low["D"], high["N"], high["D"]) == (50, 4, 50, 64)
    _check_entry(low)
    _check_entry(high)
    assert high["t_switch_50"] < low["t_switch_50"]
    _assert_png(png)
    capsys.readouterr()

    adv = tmp_path / "a.json"
    rc = main(["analyze", "advice", "--from", str(out), "--share", "0.4", "--steps", "20", "--json", str(adv)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "shift" in table and "gaussian N=50 D=64" in table
    res2 = json.loads(adv.read_text())
    assert res2["datasets"] == res["datasets"]  # the transition result is kept beside the advice
    for entry, a in zip(res["datasets"], res2["advice"], strict=True):
        assert a["switch"] == "t_switch_99" and a["t_switch"] == pytest.approx(entry["t_switch_99"])
        assert a["shift"] == pytest.approx(shift_for_share(entry["t_switch_99"], 0.4))
        assert a["steps_before_switch_shifted"] == 8
        assert a["guidance_interval"] == pytest.approx([entry["t_switch_99"], 1.0])
    # without --json the advice is stored into the --from file itself
    assert main(["analyze", "advice", "--from", str(out), "--switch", "50"]) == 0
    assert json.loads(out.read_text())["advice"][0]["switch"] == "t_switch_50"


def test_advice_measures_when_given_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a.json"
    rc = main(
        ["analyze", "advice", "--synthetic", "30:16", "--t-grid", "linspace:0.05:0.95:8", "--queries-per-t", "8",
         "--json", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["datasets"]) == 1 and len(res["advice"]) == 1
    assert "t_switch_50" in capsys.readouterr().out


def test_memorization_report_files(tmp_path: Path, labelled_file) -> None:
    data, x, _ = labelled_file
    rng = np.random.default_rng(9)
    samples = np.concatenate([x[[2, 7]], x[[11]] + 1e-3, rng.standard_normal((5, 6)) * 3.0]).astype(np.float32)
    for name, save in (
        ("s.npy", lambda p: np.save(p, samples)),
        ("s.pt", lambda p: torch.save(torch.from_numpy(samples), p)),
    ):
        sp = tmp_path / name
        save(sp)
        out, png, grid = tmp_path / f"{name}.json", tmp_path / f"{name}.png", tmp_path / f"{name}.grid.png"
        rc = main(
            ["analyze", "memorization", "--samples", str(sp), "--data", str(data), "--json", str(out),
             "--plot", str(png), "--grid", str(grid), "--image-shape", "2,3"]
        )  # fmt: skip
        assert rc == 0
        rep = json.loads(out.read_text())
        assert rep["N"] == 40 and rep["D"] == 6 and len(rep["samples"]) == 8
        assert [s["copy"] for s in rep["samples"][:3]] == [True, True, True]
        assert [s["nearest"] for s in rep["samples"][:3]] == [2, 7, 11]
        assert rep["copy_fraction"] == pytest.approx(sum(s["copy"] for s in rep["samples"]) / 8)
        for s in rep["samples"]:
            assert {"index", "nearest", "d1", "d2", "ratio", "copy"} <= set(s)
            assert s["ratio"] == pytest.approx(s["d1"] / s["d2"] if s["d2"] > 0 else 0.0)
            assert s["copy"] == (s["ratio"] < 1 / 3)
        _assert_png(png)
        _assert_png(grid)


def test_memorization_on_digits_draws_8x8_grid(tmp_path: Path) -> None:
    from floworacle_server.data._digits import digits_arrays

    x, _ = digits_arrays()
    sp = tmp_path / "gen.npy"
    np.save(
        sp, np.concatenate([x[:3], np.clip(x[3:6] + 0.5 * np.random.default_rng(0).standard_normal((3, 64)), -1, 1)])
    )
    out, grid = tmp_path / "m.json", tmp_path / "g.png"
    assert main(["analyze", "memorization", "--samples", str(sp), "--dataset", "digits", "--json", str(out),
                 "--grid", str(grid)]) == 0  # fmt: skip
    rep = json.loads(out.read_text())
    assert [s["copy"] for s in rep["samples"][:3]] == [True, True, True]
    _assert_png(grid)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["transition", "--synthetic", "50:4", "--per-class"], "no classes"),
        (["transition", "--synthetic", "50x4"], "N:D"),
        (["transition", "--synthetic", "50:4", "--t-grid", "0.5,1.5"], "must lie in"),
        (["transition", "--data", "/nonexistent/x.npy"], "does not exist"),
        (["transition", "--synthetic", "50:4", "--server", "127.0.0.1:1"], "drop --server"),
        (["advice", "--synthetic", "20:4", "--share", "1.0", "--t-grid", "0.2,0.9", "--queries-per-t", "2"], "share"),
        (["memorization", "--samples", "/nonexistent.npy", "--dataset", "digits"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv: list[str], message: str, capsys) -> None:
    assert main(["analyze", *argv, "--no-progress"] if argv[0] != "memorization" else ["analyze", *argv]) == 2
    assert message in capsys.readouterr().err


def test_advice_from_a_file_that_is_not_a_result(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["analyze", "advice", "--from", str(bad)]) == 2
    assert "not a transition result" in capsys.readouterr().err


def test_transition_through_a_running_server_matches_in_process(tmp_path: Path) -> None:
    from floworacle_server.service.testing import serve_in_thread
    from floworacle_server.settings import Settings

    common = ["--dataset", "digits", "--per-class", "--t-grid", "0.2,0.5,0.8", "--queries-per-t", "6",
              "--no-progress"]  # fmt: skip
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert main(["analyze", "transition", *common, "--json", str(local)]) == 0
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv:
        assert main(["analyze", "transition", *common, "--server", srv.address, "--json", str(remote)]) == 0
    a, b = json.loads(local.read_text()), json.loads(remote.read_text())
    assert b["source"].startswith("server ")
    assert len(a["datasets"]) == len(b["datasets"]) == 11
    for ea, eb in zip(a["datasets"], b["datasets"], strict=True):
        assert ea["name"] == eb["name"] and ea["N"] == eb["N"]
        for metric in ("top1", "entropy", "ess", "gap"):
            np.testing.assert_allclose(
                eb["curves"][metric]["mean"], ea["curves"][metric]["mean"], rtol=1e-9, atol=1e-12
            )
        assert eb["t_switch_50"] == pytest.approx(ea["t_switch_50"]) if ea["t_switch_50"] else eb["t_switch_50"] is None
