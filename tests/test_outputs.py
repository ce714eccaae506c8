"""The one output policy: nothing pnp-trt did not write is replaced (the input, a user's file, a link, a device,
a FIFO), names the file system refuses are one line, and a results set survives a kill at any point."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import random_image
from PIL import Image
from test_cli import assert_user_error, run

from pnp_trt.destination import check_destination, record_json, written_by_pnp_trt
from pnp_trt.errors import PnPError
from pnp_trt.fileio import RETIRED, staging_name, sweep_stale_staging
from pnp_trt.results import save_directory, save_file

DEAD_PID = 2**22 + 1
"""Above Linux's largest pid: never a running process."""


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` by name: a file's bytes, else what it is (links not followed)."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "dir" if path.is_dir() else "special"
    return found


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each refused --out: (extra CLI arguments, the fragment its one line must hold)."""
    guide = tmp / "guide.png"
    (tmp / "notes.txt").write_text("my notes")
    (tmp / "holiday.png").write_bytes(random_image(tmp / "x.png", 64, 64).read_bytes())
    (tmp / "x.png").unlink()
    os.mkfifo(tmp / "pipe.png")
    (tmp / "earlier").mkdir()
    (tmp / "earlier" / "translate.json").write_text('{"outputs": []}')
    (tmp / "link").symlink_to(tmp / "earlier")
    (tmp / "link.png").symlink_to(tmp / "holiday.png")
    return {
        "the-input": (["--out", str(guide)], "is the guidance image"),
        "input-hard-link": (["--out", str(_hard_link(guide, tmp / "same.png"))], "is the guidance image"),
        "input-with-overwrite": (["--out", str(guide), "--overwrite"], "is the guidance image"),
        "a-users-png": (["--out", str(tmp / "holiday.png")], "was not written by pnp-trt"),
        "not-png": (["--out", str(tmp / "notes.txt")], "give a name ending in .png"),
        "webp": (["--out", str(tmp / "result.webp")], "give a name ending in .png"),
        "fifo": (["--out", str(tmp / "pipe.png"), "--overwrite"], "is a FIFO"),
        "device": (["--out", "/dev/null", "--overwrite"], "is a device; pnp-trt never replaces one"),
        "a-users-txt-overwrite": (["--out", str(tmp / "notes.txt"), "--overwrite"], "give a name ending in .png"),
        "file-link": (["--out", str(tmp / "link.png"), "--overwrite"], "is a symbolic link"),
        "dir-link": (["--out", str(tmp / "link"), "-p", "b"], "is a symbolic link"),
        "dir-holds-input": (["--out", str(tmp), "-p", "b"], "holds the guidance image"),
        "long-name": (["--out", str(tmp / ("n" * 252 + ".png"))], "choose a shorter name"),
    }


def _hard_link(target: Path, link: Path) -> Path:
    os.link(target, link)
    return link


REFUSED = ["the-input", "input-hard-link", "input-with-overwrite", "a-users-png", "not-png", "webp", "fifo", "device",
           "a-users-txt-overwrite", "file-link", "dir-link", "dir-holds-input", "long-name"]


@pytest.mark.parametrize("case", REFUSED)
def test_an_out_pnp_trt_may_not_replace_is_one_line_and_nothing_changes(tiny_model_dir: Path, tmp_path: Path,
                                                                         case: str) -> None:
    random_image(tmp_path / "guide.png", 64, 64)
    args, fragment = _cases(tmp_path)[case]
    before = _snapshot(tmp_path)
    result = run("translate", tmp_path / "guide.png", "--model", tiny_model_dir, "-p", "a", *args, "--steps", "1")
    assert_user_error(result, fragment)
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_listed_result_that_is_a_directory_is_not_ours(tmp_path: Path) -> None:
    """A previous results directory whose listed `0_a.png` is now a directory holding a user's file is refused:
    only regular files the record lists are pnp-trt's (the swap deleted the user's file before)."""
    image, out = Image.new("RGB", (8, 8)), tmp_path / "res"
    save_directory(out, ["a", "b"], [image, image], {})
    (out / "0_a.png").unlink()
    (out / "0_a.png").mkdir()
    (out / "0_a.png" / "mine.txt").write_text("a user's notes")
    with pytest.raises(PnPError, match=r"holds files pnp-trt did not write, or that changed since it wrote them "
                                       r"\(0_a.png\)"):
        save_directory(out, ["c", "d"], [image, image], {})
    assert (out / "0_a.png" / "mine.txt").read_text() == "a user's notes"


def _png_with_chunk(path: Path, text: str | None) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("pnp-trt", text, zip=True)  # zTXt: Pillow reads it as the same key
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("chunk", ["{}", '{"outputs": ["x.png"]}', '{"written_by": "pnp-trt", "outputs": []}',
                                   '{"written_by": "pnp-trt", "outputs": ["other.png"]}', "[]"])
def test_a_png_is_ours_only_if_its_record_is_pnp_trts_and_names_it(tmp_path: Path, chunk: str) -> None:
    """Corpus round 6: a user's PNG with an empty or foreign `pnp-trt` text chunk was replaced as ours. Ours
    says written_by pnp-trt and lists the file's own name."""
    user = _png_with_chunk(tmp_path / "x.png", chunk)
    before = user.read_bytes()
    with pytest.raises(PnPError, match="exists and was not written by pnp-trt"):
        save_file(user, Image.new("RGB", (8, 8)), {})
    assert user.read_bytes() == before


def test_a_result_edited_in_a_program_that_keeps_its_text_chunk_is_not_ours(tmp_path: Path) -> None:
    """Corpus round 6: a single result retouched in an editor that keeps PNG text chunks was replaced as ours.
    Its record holds the digest of its pixels."""
    from PIL import PngImagePlugin

    out = tmp_path / "r.png"
    save_file(out, Image.new("RGB", (8, 8)), {})
    assert written_by_pnp_trt(out)
    with Image.open(out) as image:
        chunk = image.info["pnp-trt"]
    info = PngImagePlugin.PngInfo()
    info.add_text("pnp-trt", chunk)
    Image.new("RGB", (8, 8), "white").save(out, pnginfo=info)  # the user's edit, chunk kept
    before = out.read_bytes()
    with pytest.raises(PnPError, match="exists and was not written by pnp-trt"):
        save_file(out, Image.new("RGB", (8, 8)), {})
    assert out.read_bytes() == before


def test_a_directory_is_ours_only_with_our_record_and_our_unchanged_files(tmp_path: Path) -> None:
    """Corpus round 6: a user's directory holding just an i18n `translate.json`, a record listing a user's thesis
    or photo, and a results set whose image the user edited were all replaced. Now each is refused in one line
    and left byte for byte as it was; an untouched set of ours is still replaced by a rerun."""
    image = Image.new("RGB", (8, 8))
    i18n = tmp_path / "i18n"
    i18n.mkdir()
    (i18n / "translate.json").write_text('{"outputs": [], "hello": "bonjour"}')
    listed = tmp_path / "listed"
    save_directory(listed, ["a", "b"], [image, image], {})
    (listed / "thesis.txt").write_text("years of work")
    record = json.loads((listed / "translate.json").read_text())
    record["outputs"].append("thesis.txt")
    (listed / "translate.json").write_text(record_json(record))
    edited = tmp_path / "edited"
    save_directory(edited, ["a", "b"], [image, image], {})
    Image.new("RGB", (8, 8), "white").save(edited / "0_a.png")  # the user retouched a result
    for directory in (i18n, listed, edited):
        before = _snapshot(directory)
        with pytest.raises(PnPError, match="holds files pnp-trt did not write, or that changed since"):
            save_directory(directory, ["c", "d"], [image, image], {})
        assert _snapshot(directory) == before
    ours = tmp_path / "ours"
    save_directory(ours, ["a", "b"], [image, image], {})
    save_directory(ours, ["c"], [image], {})
    assert sorted(p.name for p in ours.iterdir()) == ["0_c.png", "translate.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_device_is_never_replaced_even_with_overwrite(tmp_path: Path) -> None:
    device = tmp_path / "null.png"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for several in (False, True):
        with pytest.raises(PnPError, match="is a device; pnp-trt never replaces one"):
            check_destination(device, several=several, overwrite=True)
    assert device.is_char_device()


def test_overwrite_replaces_a_users_regular_file_and_rerun_replaces_our_own(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    guide = random_image(tmp_path / "guide.png", 64, 64)
    out = tmp_path / "mine.png"
    out.write_bytes(b"a user's bytes")
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "a", "--out", out, "--steps", "1",
                 "--overwrite")
    assert result.exit_code == 0, result.output
    assert written_by_pnp_trt(out)
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "b", "--out", out, "--steps", "1")
    assert result.exit_code == 0, result.output  # ours: replaced without being asked
    assert '"b"' in Image.open(out).info["pnp-trt"]


def test_a_generated_guidance_beside_a_result_is_ours_and_a_users_is_not(tmp_path: Path) -> None:
    image, out = Image.new("RGB", (8, 8)), tmp_path / "r.png"
    save_file(out, image, {}, guidance=image)
    assert written_by_pnp_trt(tmp_path / "r.guidance.png")
    save_file(out, image, {}, guidance=image)  # a rerun replaces both
    (tmp_path / "s.guidance.png").write_bytes(b"a user's file")
    with pytest.raises(PnPError, match="the generated guidance's file .*s.guidance.png .beside --out. exists and "
                                       "was not written by pnp-trt; choose another name$"):
        save_file(tmp_path / "s.png", image, {}, guidance=image)
    with pytest.raises(PnPError, match="s.guidance.png .beside --out. exists"):  # --overwrite is for --out alone
        save_file(tmp_path / "s.png", image, {}, guidance=image, overwrite=True)
    assert not (tmp_path / "s.png").exists() and (tmp_path / "s.guidance.png").read_bytes() == b"a user's file"


def test_a_results_set_is_exchanged_in_one_step(tmp_path: Path, monkeypatch) -> None:
    """The swap is one rename(2)-class call: no moment exists with neither set at --out."""
    image, out = Image.new("RGB", (8, 8)), tmp_path / "out"
    save_directory(out, ["old"], [image], {})
    monkeypatch.setattr(Path, "rename", lambda *_: pytest.fail("a two-step swap"))
    save_directory(out, ["new"], [image], {})
    assert sorted(p.name for p in out.iterdir()) == ["0_new.png", "translate.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_set_a_killed_run_moved_aside_is_restored_before_anything_else(tmp_path: Path) -> None:
    """Where paths cannot be exchanged the old set waits under a retired name; a run killed there (SIGKILL: the
    state is built as it left it) has it put back by the next run, before its destination is even judged."""
    image, out = Image.new("RGB", (8, 8)), tmp_path / "out"
    save_directory(out, ["old"], [image], {})
    retired = tmp_path / staging_name(RETIRED, DEAD_PID, "set")
    retired.mkdir()
    out.rename(retired / "out")
    check_destination(out, several=True)
    assert sorted(p.name for p in out.iterdir()) == ["0_old.png", "translate.json"] and not retired.exists()
    live = tmp_path / staging_name(RETIRED, os.getpid(), "set")  # a live run's: left alone
    live.mkdir()
    shutil.copytree(out, live / "out")
    sweep_stale_staging(tmp_path)
    assert live.exists()


def test_without_exchange_the_swap_still_ends_with_one_whole_set(tmp_path: Path, monkeypatch) -> None:
    import pnp_trt.fileio as fileio

    image, out = Image.new("RGB", (8, 8)), tmp_path / "out"
    save_directory(out, ["old"], [image], {})
    monkeypatch.setattr(fileio, "exchange", lambda a, b: False)
    save_directory(out, ["new"], [image], {})
    assert sorted(p.name for p in out.iterdir()) == ["0_new.png", "translate.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_pair_a_killed_run_was_replacing_comes_back_whole(tmp_path: Path, monkeypatch) -> None:
    """Corpus round 6: SIGKILL while a --save-guidance run replaced r.png and r.guidance.png left the old result
    beside the new guidance. The old pair is moved aside first; a run killed before the new pair is all in gets
    the old pair back at the next run's start (here, the kill after the first file went in)."""
    out, old, new = tmp_path / "r.png", Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    save_file(out, old, {}, guidance=old)
    before = _snapshot(tmp_path)
    real, moved = os.replace, []

    def killed_after_one(source, target) -> None:
        if moved:
            raise SystemExit("killed")
        moved.append(target)
        real(source, target)

    monkeypatch.setattr(os, "replace", killed_after_one)
    with pytest.raises(SystemExit):
        save_file(out, new, {}, guidance=new)
    monkeypatch.undo()
    assert moved == [tmp_path / "r.guidance.png"] and _snapshot(tmp_path) != before
    [retired] = tmp_path.glob(f"{RETIRED}.*")
    retired.rename(tmp_path / staging_name(RETIRED, DEAD_PID, "set"))  # as a dead process left it
    sweep_stale_staging(tmp_path)
    assert _snapshot(tmp_path) == before
    save_file(out, new, {}, guidance=new)  # and a run that completes replaces the pair, leaving nothing aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.guidance.png", "r.png"]


def _edited_record(path: Path) -> None:
    from PIL import PngImagePlugin

    with Image.open(path) as image:
        record = json.loads(image.info["pnp-trt"])
        info = PngImagePlugin.PngInfo()
        info.add_text("pnp-trt", json.dumps({**record, "prompts": ["not what ran"]}))
        image.save(path, pnginfo=info)


def _comment_added(path: Path) -> None:
    from PIL import PngImagePlugin

    with Image.open(path) as image:
        info = PngImagePlugin.PngInfo()
        info.add_text("pnp-trt", image.info["pnp-trt"])
        info.add_text("Comment", "my holiday")
        image.save(path, pnginfo=info)


@pytest.mark.parametrize("edit", [
    lambda p: p.write_bytes(p.read_bytes() + b"my appended notes"),  # after IEND
    _comment_added,  # pixels and record as they were
    _edited_record,  # pixels as they were
])
def test_a_result_changed_in_any_way_since_pnp_trt_wrote_it_is_not_ours(tmp_path: Path, edit) -> None:
    """Corpus round 7: bytes appended, a chunk added, the record edited — each kept the pixels, and the result was
    replaced as ours. The record is sealed over the rest of the file and itself."""
    out = tmp_path / "r.png"
    save_file(out, Image.new("RGB", (8, 8)), {"prompts": ["a"]})
    assert written_by_pnp_trt(out)
    edit(out)
    before = out.read_bytes()
    with pytest.raises(PnPError, match="exists and was not written by pnp-trt"):
        save_file(out, Image.new("RGB", (8, 8)), {})
    assert out.read_bytes() == before


def test_a_results_record_changed_by_hand_is_not_ours(tmp_path: Path) -> None:
    """Corpus round 7: a key added to translate.json, or a user's notes.txt listed with its correct SHA-256, and
    the rerun replaced the record and deleted the notes. The record is sealed, and lists only names pnp-trt
    gives its files. Round 8: a record only re-indented, or given a final newline, was replaced too: its bytes
    are no longer pnp-trt's."""
    from pnp_trt.destination import file_digest, seal

    image = Image.new("RGB", (8, 8))
    noted, listed, indented, newline = (tmp_path / n for n in ("noted", "listed", "indented", "newline"))
    for directory in (noted, listed, indented, newline):
        save_directory(directory, ["a", "b"], [image, image], {})
    (indented / "translate.json").write_text(json.dumps(json.loads((indented / "translate.json").read_text())))
    with open(newline / "translate.json", "a") as f:
        f.write("\n")
    record = json.loads((noted / "translate.json").read_text())
    (noted / "translate.json").write_text(record_json({**record, "my_notes": "keep this"}))
    (listed / "notes.txt").write_text("mine")
    record = json.loads((listed / "translate.json").read_text())
    record["outputs"].append("notes.txt")
    record["files"]["notes.txt"] = file_digest(listed / "notes.txt")
    (listed / "translate.json").write_text(record_json({**record, "seal": seal(record)}))  # resealed, even
    for directory in (noted, listed, indented, newline):
        before = _snapshot(directory)
        with pytest.raises(PnPError, match="holds files pnp-trt did not write, or that changed since"):
            save_directory(directory, ["c"], [image], {})
        assert _snapshot(directory) == before


def test_a_result_whose_record_chunk_was_moved_is_not_ours(tmp_path: Path) -> None:
    """Corpus round 8: the record's tEXt chunk moved after IDAT (same chunks, another order) was replaced as ours;
    pnp-trt puts it after IHDR, and only a file laid out as it wrote it is its own."""
    from pnp_trt.png_chunks import SIGNATURE, chunks

    out = tmp_path / "r.png"
    save_file(out, Image.new("RGB", (8, 8)), {})
    ihdr, record, *rest = chunks(out.read_bytes())
    out.write_bytes(SIGNATURE + ihdr[1] + b"".join(c for _, c in rest[:-1]) + record[1] + rest[-1][1])
    assert [kind for kind, _ in chunks(out.read_bytes())][-2:] == [b"tEXt", b"IEND"]
    before = out.read_bytes()
    with pytest.raises(PnPError, match="exists and was not written by pnp-trt"):
        save_file(out, Image.new("RGB", (8, 8)), {})
    assert out.read_bytes() == before


def test_a_record_is_ours_only_byte_for_byte_and_a_set_only_where_it_was_written(tmp_path: Path) -> None:
    """Corpus round 9: a single PNG whose record chunk was re-spaced, re-ordered or had its checksum broken, a
    results set whose translate.json became CRLF, and a set copied or renamed to another directory were each
    replaced by a rerun. Each is now refused and left as it was."""
    from pnp_trt.png_chunks import SIGNATURE, chunks, text_chunk

    image = Image.new("RGB", (8, 8))
    singles = []
    for n, change in enumerate((lambda text: text.replace(", ", ",  ", 1),
                                lambda text: json.dumps(dict(reversed(json.loads(text).items()))))):
        out = tmp_path / f"r{n}.png"
        save_file(out, image, {})
        ihdr, record, *rest = chunks(out.read_bytes())
        text = record[1][8 + len("pnp-trt\0"):-4].decode("latin-1")
        out.write_bytes(SIGNATURE + ihdr[1] + text_chunk("pnp-trt", change(text)) + b"".join(c for _, c in rest))
        singles.append(out)
    broken = tmp_path / "crc.png"
    save_file(broken, image, {})
    data = bytearray(broken.read_bytes())
    record_end = len(SIGNATURE) + len(chunks(bytes(data))[0][1]) + len(chunks(bytes(data))[1][1])
    data[record_end - 1] ^= 0xFF  # the record chunk's CRC
    broken.write_bytes(bytes(data))
    for path in [*singles, broken]:
        before = path.read_bytes()
        with pytest.raises(PnPError, match="exists and was not written by pnp-trt"):
            save_file(path, image, {})
        assert path.read_bytes() == before
    crlf, original = tmp_path / "crlf", tmp_path / "set"
    for directory in (crlf, original):
        save_directory(directory, ["a", "b"], [image, image], {})
    (crlf / "translate.json").write_bytes((crlf / "translate.json").read_bytes().replace(b"\n", b"\r\n"))
    shutil.copytree(original, tmp_path / "copied")
    original.rename(tmp_path / "renamed")
    moved = "results were written to a directory named 'set' and copied or renamed here"
    for directory, why in ((crlf, "translate.json was edited since"), (tmp_path / "copied", moved),
                           (tmp_path / "renamed", moved)):
        before = _snapshot(directory)
        with pytest.raises(PnPError, match=f"holds files pnp-trt did not write, or that changed since it wrote them "
                                           rf"\(its {why}"):
            save_directory(directory, ["c"], [image], {})
        assert _snapshot(directory) == before


def test_a_refused_results_directory_names_what_is_not_ours(tmp_path: Path) -> None:
    """Corpus 12: an intact earlier set beside a user's file names that file (not the set's own files)."""
    image, out = Image.new("RGB", (8, 8)), tmp_path / "res"
    save_directory(out, ["a", "b"], [image, image], {})
    (out / "mine.txt").write_text("a user's notes")
    with pytest.raises(PnPError, match=r"it wrote them \(mine.txt\); choose a new or empty directory"):
        save_directory(out, ["c"], [image], {})


def test_a_rerun_without_a_guidance_takes_the_earlier_guidance_with_the_result_it_replaces(tmp_path: Path) -> None:
    """Corpus 11: the pair is replaced as a pair (a stale seed-9 guidance stayed beside a new result); a user's
    file of that name is never touched."""
    image, out = Image.new("RGB", (8, 8)), tmp_path / "r.png"
    save_file(out, image, {}, guidance=image)
    save_file(out, image, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]
    (tmp_path / "r.guidance.png").write_bytes(b"a user's file")
    save_file(out, image, {})
    assert (tmp_path / "r.guidance.png").read_bytes() == b"a user's file"


@pytest.mark.parametrize("out", [".", "./", "..", "/"])
def test_an_out_with_no_name_of_its_own_is_refused_before_any_work(tmp_path: Path, monkeypatch, out: str) -> None:
    """Corpus 13: `--out .` ran the whole job, then failed on the empty name (internal error)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PnPError, match="names a directory by a path with no name of its own .*give a new one"):
        check_destination(out, several=True)
    with pytest.raises(PnPError, match="with one --prompt give the output .png file"):
        check_destination(out, several=False)


@pytest.mark.parametrize("name", [os.fsdecode(b"\xff\xfe.png"), "\U0001F600" * 60 + ".png"],
                         ids=["not-utf-8", "240-bytes-of-emoji"])
def test_any_name_the_file_system_takes_is_written(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    """Corpus 14 (P15): a name that is not UTF-8 ran every stage, then failed naming its staging file; a long name
    of multibyte characters must leave room for the staging prefix (cut by bytes, not characters)."""
    guide = random_image(tmp_path / "guide.png", 64, 64)
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "a", "--out", tmp_path / name, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert written_by_pnp_trt(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted(["guide.png", name])
