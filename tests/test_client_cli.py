"""dxserve-client against the session server: folders, formats, exit codes, watching."""

import csv
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_VERSION

from dxserve_client.cli import main


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_plugins(server, capsys):
    code, out, _ = run(capsys, "--server", server.address, "list-plugins")
    assert "model 1.2.0 [NOT_SERVED]" in out and "safety_checks=none" in out and "ungated_versions_allowed" in out
    assert f"model {DEFAULT_VERSION} [READY]" in out and "safety_checks=out_of_distribution,quality_gate" in out
    assert code == 0
    assert "lymphoblast" in out and "[READY]" in out and "[FAILED]" in out and "sha256=" in out
    code, out, _ = run(capsys, "--server", server.address, "list-plugins", "--format", "json")
    assert {p["name"] for p in json.loads(out)} >= {"lymphoblast", "brightness"}


def test_classify_folder_as_csv(server, capsys, cell_paths, tmp_path):
    folder = tmp_path / "smear"
    (folder / "sub").mkdir(parents=True)
    for path in cell_paths[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(cell_paths[3], folder / "sub" / cell_paths[3].name)
    code, out, err = run(capsys, "--server", server.address, "classify", str(folder), "--format", "csv", "--quiet")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and rows[-1]["path"].endswith(f"sub/{cell_paths[3].name}")
    for row in rows:
        assert row["label"] in ("lymphoblast", "normal", "indeterminate")
        if row["label"] == "indeterminate":
            assert row["confidence"] == ""
        else:  # the probability of the called label, which is always the top one
            assert float(row["confidence"]) == pytest.approx(float(row[f"p_{row['label']}"]))
            assert row["label"] == row["top_label"] and float(row["confidence"]) >= 0.5
        assert row["screen_positive"] in ("True", "False") and "screen-positive at P >=" in row["rule"]
        assert float(row["p_lymphoblast"]) + float(row["p_normal"]) == pytest.approx(1, abs=1e-4)
        assert len(row["weights_sha256"]) == 64 and row["model_version"] and not row["error_code"]
    assert "4 images, 4 classified, 0 failed" in err


def test_classify_reports_failed_items_and_exits_1(server, capsys, cell_paths, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--server", server.address, "classify", str(cell_paths[0]), str(bad), str(cell_paths[1]),
                       "--format", "jsonl", "--output", str(output), "--quiet")
    assert code == 1
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["error_code"] for r in records] == ["", "INVALID_ARGUMENT", ""]
    assert records[1]["path"] == str(bad)
    assert "image" in records[1]["error_message"]
    assert records[2]["p_lymphoblast"] != ""
    assert "1 failed" in err


def test_table_output(server, capsys, cell_paths):
    code, out, _ = run(capsys, "--server", server.address, "classify", str(cell_paths[0]), "--quiet")
    assert code == 0 and cell_paths[0].name in out and "sha256" in out


def test_unknown_plugin_exits_2(server, capsys, cell_paths):
    code, _, err = run(capsys, "--server", server.address, "classify", str(cell_paths[0]), "--plugin", "nope")
    assert code == 2 and "unknown plugin" in err


def test_watch_classifies_new_files(server, capsys, cell_paths, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(cell_paths[0], inbox / "first.png")

    def arrive_later():
        time.sleep(1.0)
        shutil.copy(cell_paths[1], inbox / "second.png")

    threading.Thread(target=arrive_later).start()
    code, out, _ = run(capsys, "--server", server.address, "classify", str(inbox), "--watch", "--poll-interval", "0.2",
                       "--idle-exit", "3", "--format", "jsonl", "--quiet")
    assert code == 0
    assert [json.loads(line)["path"].rsplit("/", 1)[-1] for line in out.splitlines()] == ["first.png", "second.png"]


def test_unreachable_server_exits_2(capsys, cell_paths):
    from conftest import free_port

    code, _, err = run(capsys, "--server", f"127.0.0.1:{free_port()}", "--timeout", "2", "list-plugins")
    assert code == 2 and "UNAVAILABLE" in err


def test_output_piped_into_a_reader_that_leaves_early(server, cell_paths):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dxserve_client.cli", "--server", server.address, "classify",
                             *map(str, cell_paths * 20), "--format", "jsonl", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["error_code"] == ""
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err


def test_classify_with_specimens_per_folder_and_explanations(server, capsys, cell_paths, tmp_path):
    for smear, paths in (("smear-1", cell_paths[:3]), ("smear-2", cell_paths[3:5])):
        (tmp_path / "smears" / smear).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, tmp_path / "smears" / smear / path.name)
    summaries, heatmaps = tmp_path / "specimens.json", tmp_path / "heatmaps"
    code, out, err = run(capsys, "--server", server.address, "classify", str(tmp_path / "smears"), "--specimen-per-folder",
                         "--format", "csv", "--quiet", "--specimen-output", str(summaries), "--explain", str(heatmaps))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["specimen_id"] for r in rows] == ["smears/smear-1"] * 3 + ["smears/smear-2"] * 2
    written = json.loads(summaries.read_text())
    assert [(s["specimen_id"], s["cells_seen"], s["final"]) for s in written] == [("smears/smear-1", 3, True), ("smears/smear-2", 2, True)]
    assert "specimen smears/smear-1" in err and "not a diagnosis" in err
    (run_dir,) = heatmaps.iterdir()  # one folder per run: a second run never overwrites the first
    overlays = sorted(run_dir.glob("*.overlay.png"))
    assert len(overlays) == 5 and len(list(run_dir.glob("*.heatmap.png"))) == 5
    assert all(p.name.endswith((".lymphoblast.overlay.png", ".normal.overlay.png")) for p in overlays)  # which label it explains
    assert f"explanations: {run_dir}/ (10 files)" in err  # said where they went
    from PIL import Image

    with Image.open(overlays[0]) as overlay, Image.open(str(overlays[0]).replace(".overlay.", ".heatmap.")) as heat:
        assert overlay.height > heat.height  # the legend strip under the image
    run(capsys, "--server", server.address, "classify", str(cell_paths[0]), "--quiet", "--explain", str(heatmaps))
    assert len(list(heatmaps.iterdir())) == 2 and len(list(run_dir.glob("*.overlay.png"))) == 5

    code, out, err = run(capsys, "--server", server.address, "classify", str(cell_paths[0]), "--specimen-id", "S9",
                         "--format", "jsonl", "--quiet")
    assert code == 0 and json.loads(out)["specimen_id"] == "S9" and "specimen S9" in err


def test_watching_client_carries_on_across_a_server_restart(capsys, tmp_path):
    """`classify --watch`: the server behind the address is replaced while images keep arriving;
    the CLI resends what the stopping server did not answer and every image is classified once
    (with --resume-within 0 the same run exits 2)."""
    import numpy as np

    from conftest import ServerProcess, wait_serving
    from dxserve_client.client import encode_png

    light = ("--disabled-plugins", "lymphoblast", "--disabled-plugins", "flaky")
    first = ServerProcess(*light, tmp=tmp_path)
    wait_serving(first.address, ["brightness"], timeout_s=60)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    replacement = []

    def arrive_and_restart():
        for i in range(12):
            (inbox / f"{i:02d}.png").write_bytes(encode_png(np.full((8, 8, 3), 20 * i, np.uint8)))
            if i == 5:
                first.process.send_signal(15)
                assert first.process.wait(30) == 0
                replacement.append(ServerProcess(*light, tmp=tmp_path, port=first.port))
            time.sleep(0.3)

    feeder = threading.Thread(target=arrive_and_restart)
    feeder.start()
    try:
        code, out, err = run(capsys, "--server", first.address, "classify", str(inbox), "--watch", "--plugin", "brightness",
                             "--poll-interval", "0.1", "--idle-exit", "4", "--format", "jsonl", "--quiet")
        feeder.join()
        assert code == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        # Each once; not in name order: a file present when the watch starts waits to hold still, and one
        # written after it is complete when closed, so under load 01.png was answered before 00.png.
        assert sorted(r["path"].rsplit("/", 1)[-1] for r in records) == [f"{i:02d}.png" for i in range(12)]
        assert all(r["label"] in ("dark", "bright") for r in records)
    finally:
        first.stop()
        assert replacement and replacement[0].stop() == 0


def test_a_missing_file_is_named_and_not_sent(server, capsys, cell_paths, tmp_path):
    code, out, err = run(capsys, "--server", server.address, "classify", str(tmp_path / "gone.png"), str(cell_paths[0]),
                         "--format", "jsonl", "--quiet")
    records = {json.loads(line)["path"]: json.loads(line) for line in out.splitlines()}
    assert code == 1 and len(records) == 2
    missing = records[str(tmp_path / "gone.png")]
    assert missing["error_code"] == "NOT_FOUND" and "file not found" in missing["error_message"] and "not sent" in missing["error_message"]
    assert records[str(cell_paths[0])]["error_code"] == ""
    assert "1 failed" in err


def test_the_client_waits_for_a_plugin_that_is_loading(capsys, tmp_path):
    """Just after a restart the plugin is LOADING: the CLI waits (up to --wait) instead of failing
    every image; past --wait it says so and exits 2."""
    from dxserve.testing import serving
    from dxserve_client.client import encode_png
    from dxserve_testplugins import slow

    from conftest import UNGATED

    import numpy as np

    image = tmp_path / "grey.png"
    image.write_bytes(encode_png(np.full((8, 8, 3), 128, np.uint8)))
    slow.RELEASE.clear()
    try:
        _classify_while_loading(capsys, image, serving, slow, UNGATED)
    finally:
        slow.RELEASE.clear()  # the next test of the slow plugin needs it blocking again


def _classify_while_loading(capsys, image, serving, slow, UNGATED):
    with serving(modules=("dxserve_testplugins.slow",), disabled_plugins=["lymphoblast", "flaky", "brightness"],
                 ungated_versions_allowed=UNGATED) as client:
        address = client.channel._channel.target().decode()
        code, _, err = run(capsys, "--server", address, "classify", str(image), "--plugin", "slow", "--wait", "0.5", "--quiet")
        assert code == 2 and "still loading after 0.5 s" in err
        threading.Timer(1.0, slow.RELEASE.set).start()
        code, out, err = run(capsys, "--server", address, "classify", str(image), "--plugin", "slow", "--format", "jsonl", "--quiet")
        assert code == 0, err
        assert "waiting for plugin 'slow' to load" in err and json.loads(out)["label"] in ("dark", "bright")


def test_watch_takes_a_file_once_complete_and_remembers_across_restarts(server, capsys, cell_paths, tmp_path):
    """A file written slowly in two parts is classified once, whole; a restarted watcher sends
    nothing it has answered, but does send a new file (and a rewritten one)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(cell_paths[0], inbox / "first.png")
    data = cell_paths[1].read_bytes()

    def write_slowly():
        time.sleep(0.5)
        with (inbox / "slow.png").open("wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(1.5)  # longer than --poll-interval: it may look complete, and fail to decode, before the rest comes
            f.write(data[len(data) // 2:])

    writer = threading.Thread(target=write_slowly)
    writer.start()
    watch = ("--server", server.address, "classify", str(inbox), "--watch", "--poll-interval", "0.3", "--idle-exit", "3",
             "--format", "jsonl", "--quiet")
    code, out, err = run(capsys, *watch)
    writer.join()
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in records) == ["first.png", "slow.png"]
    assert all(r["error_code"] == "" for r in records)
    assert (inbox / ".dxserve-client-sent.jsonl").exists()

    code, out, _ = run(capsys, *watch)  # restarted: nothing new
    assert code == 0 and out.strip() == ""
    shutil.copy(cell_paths[2], inbox / "third.png")
    (inbox / "junk.png").write_bytes(b"not an image")  # damaged for good: reported once it stays unchanged
    code, out, _ = run(capsys, *watch)
    records = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in out.splitlines()}
    assert code == 1 and sorted(records) == ["junk.png", "third.png"]
    assert records["junk.png"]["error_code"] == "INVALID_ARGUMENT" and records["third.png"]["error_code"] == ""


def test_one_oversized_image_costs_only_itself(tmp_path, capsys):
    """Issue 31: an uncompressed 2,500 px TIFF (18.75 MB) in a folder, against a server with the
    default 16 MiB limit: that item is refused alone, every other image is answered and printed,
    and the run exits 1 (it used to end at the client's own send limit, exit 2, nothing printed)."""
    import numpy as np
    from PIL import Image

    from conftest import ServerProcess, wait_serving
    from dxserve_client.client import encode_png

    folder = tmp_path / "run"
    folder.mkdir()
    for name, value in (("a.png", 40), ("c.png", 220)):
        (folder / name).write_bytes(encode_png(np.full((32, 32, 3), value, np.uint8)))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2500, 2500, 3), dtype=np.uint8)).save(folder / "b.tiff")
    assert (folder / "b.tiff").stat().st_size > 16 * 1024 * 1024
    server = ServerProcess("--disabled-plugins", "lymphoblast", "--disabled-plugins", "flaky", tmp=tmp_path)
    try:
        wait_serving(server.address, ["brightness"], timeout_s=60)
        code, out, err = run(capsys, "--server", server.address, "classify", str(folder), "--plugin", "brightness",
                             "--format", "jsonl", "--quiet")
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 1, err
        assert [Path(r["path"]).name for r in rows] == ["a.png", "b.tiff", "c.png"]
        assert [r["label"] for r in rows if not r.get("error_code")] == ["dark", "bright"]
        assert next(r for r in rows if r["path"].endswith("b.tiff"))["error_code"] == "RESOURCE_EXHAUSTED"
    finally:
        assert server.stop() == 0
