"""The main job's real model and data load from their PyPI packages, and every method runs end to end;
its command line refuses bad values up front, it shows progress, prints and saves each row as it finishes,
and Ctrl-C keeps the finished rows."""
import io
import json
import os

import pytest
import torch

from peftops import data, demo, force_backend


def test_rotten_tomatoes_split_by_movie():
    train, test = data.load_rotten_tomatoes()
    assert len(train) > 8000 and len(test) > 1500
    assert not set(train.movies) & set(test.movies)
    assert set(train.labels) == {0, 1}
    assert all(t for t in train.texts[:100])


def test_minilm_loads_real_weights():
    model, tok = demo.load_classifier(seed=0, device=torch.device("cpu"))
    enc = tok(["a gripping, beautifully shot film"], return_tensors="pt")
    h = model.encoder(**enc).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all()
    # pretrained, not random: the word embeddings of a real checkpoint are far from N(0, 0.02)
    assert model.encoder.embeddings.word_embeddings.weight.std() > 0.03


def test_demo_runs_every_method(tmp_path, capsys):
    # the CPU path a user gets (references); the kernels are checked against them in their own tests,
    # and the interpreter is far too slow for a real 22M-parameter model
    with force_backend("reference"):
        rc = demo.main(["--steps", "3", "--eval-size", "16", "--batch-size", "4", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    out, err = cap.out, cap.err
    saved = json.load(open(tmp_path / "results.json"))
    rows = saved["rows"]
    assert [r["method"] for r in rows] == demo.DEFAULT_METHODS
    errors = {r["method"]: r["error"] for r in rows if "error" in r}
    assert rc == 0 and not errors, errors
    assert saved["status"] == "done" and saved["pending"] == []
    for r in rows:
        assert r["trainable"] > 0 and r["adapter_mib"] > 0 and r["step_ms"] > 0
    assert "method" in out and "acc after" in out
    # progress on stderr, one line per phase (capsys is no terminal: no bars, no carriage returns)
    n = len(demo.DEFAULT_METHODS)
    assert "\r" not in err
    for i, m in enumerate(demo.DEFAULT_METHODS, 1):
        for line in (f"method {i}/{n}: {m}", f"[{i}/{n} {m}] load + prepare: ready",
                     f"[{i}/{n} {m}] eval before: accuracy", f"[{i}/{n} {m}] train: 3 steps of",
                     f"[{i}/{n} {m}] eval after: accuracy"):
            assert line in err, (line, err)
        # each row on stdout as soon as its method finished, before the table
        assert out.index(f"done {i}/{n}: {m}: acc ") < _table_start(out)



TINY = ["--steps", "1", "--eval-size", "1", "--batch-size", "1"]  # the smallest run the demo allows


def _table_start(out: str) -> int:
    i = next(i for i, line in enumerate(out.splitlines(keepends=True)) if line.startswith("method ") and "acc before" in line)
    return sum(len(line) for line in out.splitlines(keepends=True)[:i])


@pytest.mark.parametrize("args, expected", [
    (["--steps", "-5"], "expected an integer >= 1, got -5"),
    (["--steps", "0"], "expected an integer >= 1, got 0"),
    (["--steps", "2.5"], "expected an integer >= 1, got '2.5'"),
    (["--batch-size", "0"], "expected an integer >= 1, got 0"),
    (["--eval-size", "-1"], "expected an integer >= 1, got -1"),
    (["--rank", "0"], "expected an integer >= 1, got 0"),
    (["--threads", "0"], "expected an integer >= 1, got 0"),
    (["--seed", "-1"], "expected an integer in [0, 4294967295], got -1"),
    (["--lr-full", "0"], "expected a finite number > 0, got 0"),
    (["--lr-adapter", "nan"], "expected a finite number > 0, got nan"),
    (["--lr-sift", "inf"], "expected a finite number > 0, got inf"),
    (["--lr-aot", "-0.001"], "expected a finite number > 0, got -0.001"),
    (["--lr-aot=-1e-3"], "expected a finite number > 0, got -1e-3"),
    (["--lr-head", "fast"], "expected a finite number > 0, got 'fast'"),
    (["--density", "0"], "expected a number in (0, 1], got 0"),
    (["--density", "1.5"], "expected a number in (0, 1], got 1.5"),
    (["--safe-threshold", "-0.1"], "expected a number in [0, 1], got -0.1"),
    (["--methods", "sift,dora"], "unknown method 'dora'; choose from full, lora, sift, aot, wegeft, wegeft+safe"),
    (["--methods", ","], "expected a comma list of methods from full, lora"),
    (["--methods", "sift,sift"], "method 'sift' listed twice"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_arguments_are_argparse_errors_naming_the_option(tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {args[0].split('=')[0]}: {expected}" in err, err
    assert "Traceback" not in err and err.startswith("usage: python -m peftops.demo")
    assert not out.exists()  # refused before anything ran or was written


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "results.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(f)])
    assert e.value.code == 2
    assert "error: argument --out:" in capsys.readouterr().err and f.read_text() == "{}"


def test_help_describes_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    fmt = demo._HelpFormatter("python -m peftops.demo")
    for action in demo.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and action.option_strings[0] in out, action.dest
        assert "(default: " in fmt._get_help_string(action), action.dest
    for shown in ("(default: 16)", "(default: 60; with --full: 600)", "(default: 0.01)", "(default: runs/demo)",
                  "(default: full,lora,sift,aot,wegeft,wegeft+safe)"):
        assert shown in out, shown


def test_progress_without_a_terminal_is_one_line_per_phase():
    buf = io.StringIO()  # not a TTY, like a CI log
    pr = demo.Progress(stream=buf)
    assert not pr.bars
    with pr.phase("[1/2 x] train", total=3, unit="step") as ph:
        for i in range(3):
            ph.update(1, f"loss {i}")
        ph.done("3 steps")
    with pytest.raises(KeyboardInterrupt):
        with pr.phase("[2/2 y] train", total=3, unit="step") as ph:
            raise KeyboardInterrupt  # an interrupted phase has no summary line
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[1/2 x] train: 3 steps (") and "\r" not in buf.getvalue()
    # a long quiet phase says it is still running, at most every heartbeat_s
    buf = io.StringIO()
    with demo.Progress(stream=buf, heartbeat_s=1e-9).phase("[1/1 z] train", total=3, unit="step") as ph:
        for i in range(3):
            ph.update(1, f"loss {i}")
        ph.done("3 steps")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[1/1 z] train: 1/3 steps so far, loss 0 (") and len(lines) == 3
    # on a terminal: a tqdm bar, then the same summary line
    buf = io.StringIO()
    with demo.Progress(stream=buf, bars=True).phase("[1/1 z] eval", total=2, unit="snippet") as ph:
        ph.update(2)
        ph.done("accuracy 50.0%")
    assert "\r" in buf.getvalue() and buf.getvalue().splitlines()[-1].startswith("[1/1 z] eval: accuracy 50.0% (")
    assert not demo.Progress(enabled=False, stream=buf, bars=True).bars


def test_ctrl_c_in_the_second_method_keeps_the_first_row(tmp_path, capsys, monkeypatch):
    real_step, seen = demo.train_step, []

    def step(prep, batch, i):
        if seen:  # the first step of the second method (one step each)
            seen.append(json.load(open(tmp_path / "results.json")))  # what a reader sees right then
            raise KeyboardInterrupt
        seen.append(None)
        return real_step(prep, batch, i)

    monkeypatch.setattr(demo, "train_step", step)
    with force_backend("reference"):
        rc = demo.main(["--methods", "aot,wegeft", *TINY, "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 130
    during = seen[1]  # saved incrementally: the first row was on disk while the second method ran
    assert during["status"] == "running" and [r["method"] for r in during["rows"]] == ["aot"]
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["status"] == "interrupted" and saved["pending"] == ["wegeft"]
    assert [r["method"] for r in saved["rows"]] == ["aot"] and "error" not in saved["rows"][0]
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file + os.replace, nothing left over
    assert "Traceback" not in err and "Traceback" not in out and "KeyboardInterrupt" not in err
    msg = [line for line in err.splitlines() if "interrupted" in line]
    assert msg == [f"interrupted (Ctrl-C) during method 2/2 wegeft: 1 of 2 methods finished, their rows kept in "
                   f"{tmp_path / 'results.json'}"], err
    assert "[2/2 wegeft] train:" not in err  # the interrupted phase has no summary line
    assert out.index("done 1/2: aot: acc ") < _table_start(out)
    table = out[_table_start(out):]
    assert "\naot " in table and "wegeft" not in table


def test_a_failing_method_shows_its_error_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    def broken(model, args, train_iter):
        raise RuntimeError("boom")

    monkeypatch.setitem(demo.PREPARE, "aot", broken)
    with force_backend("reference"):
        rc = demo.main(["--methods", "aot,wegeft", *TINY, "--no-progress", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["status"] == "done"
    assert saved["rows"][0] == {"method": "aot", "error": "RuntimeError: boom"}
    assert saved["rows"][1]["method"] == "wegeft" and "error" not in saved["rows"][1]
    assert "done 1/2: aot: FAILED RuntimeError: boom" in out and "done 2/2: wegeft: acc " in out
    assert "[1/2 aot] failed: RuntimeError: boom" in err
    assert any(line.startswith("aot ") and "RuntimeError: boom" in line for line in out[_table_start(out):].splitlines())


def test_results_json_is_replaced_atomically(tmp_path):
    path = tmp_path / "results.json"
    demo.write_json_atomic(str(path), {"rows": [1]})
    umask = os.umask(0)
    os.umask(umask)
    assert json.load(open(path)) == {"rows": [1]} and (path.stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(TypeError):  # a write that fails half-way leaves the previous file whole
        demo.write_json_atomic(str(path), {"rows": [1, 2], "bad": object()})
    assert json.load(open(path)) == {"rows": [1]} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_plot_shows_accuracy_before_and_after(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the [demo] extra; the demo runs without it (no plot)
    row = {"acc_before": 0.473, "acc_after": 0.754, "trainable": 10, "step_ms": 5.0}
    rows = [{"method": "full", **row}, {"method": "lora", **row, "acc_before": 0.3}, {"method": "aot", "error": "x"}]
    assert demo.plot(rows, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, *a, **k):
        ax = fig.axes[0]
        seen["heights"] = [round(b.get_height(), 1) for b in ax.patches]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    demo.plot(rows, str(tmp_path / "q.png"))
    assert seen == {"heights": [47.3, 30.0, 75.4, 75.4], "legend": ["before", "after"]}
