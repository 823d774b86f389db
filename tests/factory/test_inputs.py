"""Reading prompt data sets: files, row formats, media parts, and the reasons bad rows are quarantined."""

from __future__ import annotations

import base64
import io
import json
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from factory.inputs import (
    InputError,
    MediaPaths,
    count_rows,
    input_files,
    normalize,
    read_rows,
    resample_turns,
    to_renderer_messages,
)
from factory.job import InputConfig
from factory.prompts import chitchat_chats, write_chitchat_prompts
from factory.targets import ImageTooLarge, open_image

from poison_rows import bomb_chat, bomb_png, deeply_nested_line


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(*turns: str) -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


def png_data_uri(color=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(seconds: float = 0.2, rate: int = 16000) -> str:
    samples = (np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(rate * seconds))) * 16000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def test_rows_come_lazily_in_a_fixed_order_with_their_file_and_row(tmp_path):
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", [chat("a0", "x"), chat("a1", "y")])
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}"} for i in range(3)]), d / "b" / "c.parquet",
                   row_group_size=2)
    (d / "notes.txt").write_text("not data")
    config = InputConfig(paths=(d,), prompt_column="prompt")
    assert [p.name for p in input_files(config)] == ["a.jsonl", "c.parquet"]
    rows = list(read_rows(config))
    assert [(Path(r.file).name, r.row, r.index) for r in rows] == [
        ("a.jsonl", 0, 0), ("a.jsonl", 1, 1), ("c.parquet", 0, 2), ("c.parquet", 1, 3), ("c.parquet", 2, 4)]
    assert rows[3].data == {"prompt": "p1"}
    assert count_rows(config) == 5
    limited = InputConfig(paths=(d,), prompt_column="prompt", max_samples=3)
    assert len(list(read_rows(limited))) == 3 and count_rows(limited) == 3


def test_unparseable_lines_are_rows_with_an_error_and_blank_lines_are_not_rows(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [chat("ok", "fine"), "{not json", "", "[1, 2]", chat("last", "one")])
    rows = list(read_rows(InputConfig(paths=(path,))))
    assert [r.row for r in rows] == [0, 1, 2, 3]
    assert rows[1].data is None and "not valid JSON" in rows[1].error
    assert "must be a JSON object" in rows[2].error
    assert rows[3].data == chat("last", "one")
    assert count_rows(InputConfig(paths=(path,))) == 4


def test_a_line_nested_deeper_than_the_parser_recurses_is_a_row_with_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [chat("ok", "fine"), deeply_nested_line(), "1" * 5000,
                                              chat("last", "one")])
    rows = list(read_rows(InputConfig(paths=(path,))))
    assert [r.row for r in rows] == [0, 1, 2, 3]
    assert rows[1].data is None and "nested too deeply to parse" in rows[1].error
    assert rows[2].data is None and "not valid JSON" in rows[2].error  # an integer of 5000 digits
    assert rows[3].data == chat("last", "one")


def test_missing_paths_and_unknown_file_types_fail_before_any_row_is_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        input_files(InputConfig(paths=(tmp_path / "nope.jsonl",)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        input_files(InputConfig(paths=(tmp_path / "empty",)))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format"):
        input_files(InputConfig(paths=(tmp_path / "x.csv",)))


def test_openai_sharegpt_and_prompt_rows_become_the_same_messages():
    config = InputConfig(paths=(Path("."),), prompt_column="question")
    openai = normalize(chat("Hi", "Hello"), config)
    sharegpt = normalize({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                         config)
    assert openai == sharegpt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert normalize({"question": "Why?"}, config) == [{"role": "user", "content": "Why?"}]
    system = normalize({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Q"}]},
                       config)
    assert [m["role"] for m in system] == ["system", "user"]


@pytest.mark.parametrize("row, reason", [
    ({"text": "hi"}, "none of the fields"),
    ({"messages": []}, "field messages must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"field messages\[0\]\.role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, r"field messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}]},
     r"messages\[1\]: a system turn may only come first"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
     r"field messages\[0\]\.content\[0\] must be a text, image_url or input_audio part"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such.png"}}]}]},
     "does not exist"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "mp3"}}]}]},
     "format: 'wav'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"field conversations\[0\]\.from must be one of"),
    ({"conversations": [{"from": "human", "value": None}]}, r"field conversations\[0\]\.value must be a string"),
])
def test_malformed_rows_raise_an_error_naming_the_field(row, reason):
    with pytest.raises(InputError, match=reason):
        normalize(row, InputConfig(paths=(Path("."),)))


def test_prompt_format_requires_the_column_and_a_non_empty_string():
    config = InputConfig(paths=(Path("."),), format="prompt", prompt_column="q")
    with pytest.raises(InputError, match="field q must be a non-empty string"):
        normalize({"q": "  "}, config)


def test_image_and_audio_parts_are_decoded_for_the_renderer(tmp_path):
    image_file = tmp_path / "blue.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(image_file)
    row = {"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": png_data_uri()}},
            {"type": "image_url", "image_url": {"url": str(image_file)}},
            {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
        ]},
        {"role": "assistant", "content": "Red, blue and a tone."},
    ]}
    messages = normalize(row, InputConfig(paths=(Path("."),)))
    assert messages == row["messages"]  # still JSON: ids hash it, servers are sent it
    parts = to_renderer_messages(messages)[0]["content"]
    assert parts[0] == {"type": "text", "text": "Look:"}
    assert parts[1]["type"] == "image" and parts[1]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert parts[2] == {"type": "image", "image": image_file}
    audio = parts[3]["audio"]
    assert parts[3]["type"] == "audio" and audio["sampling_rate"] == 16000 and audio["array"].shape == (3200,)
    assert 0.4 < float(np.abs(audio["array"]).max()) < 0.5


def test_undecodable_media_is_an_error_naming_the_part():
    bad_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(InputError, match=r"messages\[0\]\.content\[0\]\.image_url\.url: not a readable base64 image"):
        to_renderer_messages(bad_image)
    bad_audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "bm90IGEgd2F2",
                                                                                     "format": "wav"}}]}]
    with pytest.raises(InputError, match="not a readable base64 WAV"):
        to_renderer_messages(bad_audio)


def test_an_image_declaring_more_pixels_than_the_limit_is_refused_before_it_is_decoded(tmp_path):
    messages = normalize(bomb_chat(), InputConfig(paths=(Path("."),)))
    with pytest.raises(InputError, match=r"field messages\[0\]\.content\[1\]\.image_url\.url: the image declares "
                                         r"more pixels than this factory decodes \(.*3600000000 pixels"):
        to_renderer_messages(messages)
    # The same bomb as a file, as the renderer opens it; and one PIL would only warn about (10^8 pixels).
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    with pytest.raises(ImageTooLarge, match="3600000000 pixels"):
        open_image(path)
    path.write_bytes(bomb_png(10000, 10000))
    with pytest.raises(ImageTooLarge, match=r"the image declares 10000 x 10000 pixels, more than the \d+ this "
                                            r"factory decodes"):
        open_image(path)


def test_a_wav_cut_inside_a_sample_is_an_error_naming_the_part():
    data = base64.b64decode(wav_base64())[:-3]  # the header still declares every frame
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
    with pytest.raises(InputError, match=r"content\[0\]\.input_audio\.data: the WAV holds \d+ bytes of samples"):
        to_renderer_messages([{"role": "user", "content": [part]}])


def image_row(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                         {"role": "assistant", "content": "A cat."}]}


def media_reason(url: str, media: MediaPaths) -> str | None:
    """Why a row naming `url` is refused at read and at render (the same reason), or None."""
    config = InputConfig(paths=(Path("."),))
    try:
        messages = normalize(image_row(url), config, media)
    except InputError as e:
        with pytest.raises(InputError) as again:
            to_renderer_messages(image_row(url)["messages"], media)
        assert str(again.value) == str(e)
        return str(e)
    to_renderer_messages(messages, media)
    return None


@pytest.fixture()
def media_tree(tmp_path, monkeypatch) -> dict[str, Path]:
    """A data root and an input root, a file outside both, a symlink from inside to it, and a home
    directory (HOME) holding a file."""
    tree = {name: tmp_path / name for name in ("data", "models", "elsewhere", "home")}
    for d in tree.values():
        d.mkdir()
    for d in ("data", "models", "elsewhere", "home"):
        Image.new("RGB", (4, 4), (0, 0, 255)).save(tree[d] / "cat.png")
    (tree["data"] / "link.png").symlink_to(tree["elsewhere"] / "cat.png")
    monkeypatch.setenv("HOME", str(tree["home"]))
    return tree


def service_media(tree: dict[str, Path]) -> MediaPaths:
    return MediaPaths.confined((tree["data"], tree["models"]), base=tree["data"])


def test_through_the_service_a_media_file_inside_a_root_is_read(media_tree):
    media = service_media(media_tree)
    for url in (str(media_tree["data"] / "cat.png"), str(media_tree["models"] / "cat.png"), "cat.png"):
        assert media_reason(url, media) is None, url
    [part] = to_renderer_messages(image_row("cat.png")["messages"], media)[0]["content"]
    assert part == {"type": "image", "image": (media_tree["data"] / "cat.png").resolve()}


@pytest.mark.parametrize("where", ["outside", "symlink out", "home", "dot-dot"])
def test_through_the_service_a_media_path_leading_out_of_the_roots_is_refused_as_if_missing(media_tree, where):
    url = {"outside": str(media_tree["elsewhere"] / "cat.png"), "symlink out": str(media_tree["data"] / "link.png"),
           "home": "~/cat.png",  # exists once ~ is expanded; through the service it never is
           "dot-dot": "../elsewhere/cat.png"}[where]
    missing = str(media_tree["data"] / "no-such.png")
    media = service_media(media_tree)
    refused, absent = media_reason(url, media), media_reason(missing, media)
    assert refused == (f"field messages[0].content[0].image_url.url: image file {url} is not readable by this job "
                       f"(missing, or outside the service's data and input roots)")
    assert refused.replace(url, "X") == absent.replace(missing, "X")  # nothing tells the two apart


def test_factory_run_reads_media_files_as_the_users_own_anywhere_and_expands_home(media_tree):
    media = MediaPaths()  # what `factory run` reads with
    for url in (str(media_tree["elsewhere"] / "cat.png"), str(media_tree["data"] / "link.png"), "~/cat.png"):
        assert media_reason(url, media) is None, url
    [part] = to_renderer_messages(image_row("~/cat.png")["messages"], media)[0]["content"]
    assert part == {"type": "image", "image": media_tree["home"] / "cat.png"}
    missing = str(media_tree["elsewhere"] / "no-such.png")
    assert media_reason(missing, media) == f"field messages[0].content[0].image_url.url: image file {missing} does " \
                                           f"not exist"


def test_resampling_answers_where_the_source_answered_and_after_a_final_user_turn():
    s, u1, a1, u2, a2 = ({"role": r, "content": r + str(i)} for i, r in
                         enumerate(["system", "user", "assistant", "user", "assistant"]))
    assert resample_turns([s, u1, a1, u2, a2]) == [[s, u1], [u2]]
    assert resample_turns([s, u1, a1, u2]) == [[s, u1], [u2]]
    assert resample_turns([u1, u2, a1]) == [[u1, u2]]
    assert resample_turns([u1, a1, a2]) == [[u1]]
    with pytest.raises(InputError, match="assistant turn before any user turn"):
        resample_turns([s, a1, u1])


def test_chitchat_prompts_are_real_multi_turn_chats_in_openai_form(tmp_path):
    pytest.importorskip("chitchat_dataset")
    chats = chitchat_chats(20, max_user_turns=2)
    assert len(chats) == 20
    for messages in chats:
        assert messages[0]["role"] == "user"
        assert sum(m["role"] == "user" for m in messages) <= 2
        assert all(m["content"].strip() for m in messages)
    path = write_chitchat_prompts(tmp_path / "p.jsonl", 20)
    rows = list(read_rows(InputConfig(paths=(path,))))
    assert [normalize(r.data, InputConfig(paths=(path,))) for r in rows] == chats
