"""Profiles an operator adds without editing the package: a profiles folder and --profile-file.

Detection runs on the fake root filesystems in tests/fixtures/boards; the profiles folder is
a tmp dir standing in for /etc/edgeagent/profiles.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devices.detect import detect
from devices.errors import ProfileInvalid, UnknownProfile
from devices.profile import list_profiles, load_profile, load_profile_file
from edgeagent.cli.agent import COMMANDS, DESCRIPTION
from edgeagent.cli.common import build_parser, run
from edgeagent.config import ConfigError, load_config

BOARDS = Path(__file__).parent / "fixtures" / "boards"

MYBOARD = """\
# A board the package does not know: two A55 cores, LiteRT only.
name = "myboard"
description = "Example SBC: 2x Cortex-A55, 512 MB"
architectures = ["aarch64"]
memory_class = "small"

[[candidates]]
runtime = "litert"
delegate = "xnnpack"
precision = "int8"
threads = 2

[[candidates]]
runtime = "litert"
delegate = "xnnpack"
precision = "fp32"
threads = 2
"""


def edgeagent(*argv: str | Path) -> int:
    return run(build_parser("edgeagent", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "etc" / "edgeagent" / "profiles"
    folder.mkdir(parents=True)
    (folder / "myboard.toml").write_text(MYBOARD)
    return folder


def test_a_local_profile_is_listed_and_loads(profiles_dir: Path) -> None:
    assert "myboard" in list_profiles(profiles_dir)
    assert "myboard" not in list_profiles()  # the shipped set is untouched
    profile = load_profile("myboard", profiles_dir)
    assert [str(c) for c in profile.candidates] == ["litert/xnnpack/int8", "litert/xnnpack/fp32"]
    with pytest.raises(UnknownProfile, match="myboard"):
        load_profile("myboard")


def test_a_missing_folder_means_the_shipped_profiles(tmp_path: Path) -> None:
    assert list_profiles(tmp_path / "absent") == list_profiles()


def test_a_local_file_replaces_the_shipped_profile_detection_picks(profiles_dir: Path) -> None:
    (profiles_dir / "rpi4.toml").write_text(MYBOARD.replace('"myboard"', '"rpi4"'))
    detection = detect(BOARDS / "rpi4", profiles_dir=profiles_dir)
    assert detection.profile == "rpi4" and detection.source == "detected"
    assert [c.threads for c in detection.candidates] == [2, 2]  # the local file, not the shipped one
    assert detect(BOARDS / "rpi4").candidates == load_profile("rpi4").candidates


def test_override_by_name_and_by_file(profiles_dir: Path) -> None:
    by_name = detect(BOARDS / "rpi4", override="myboard", profiles_dir=profiles_dir)
    by_file = detect(BOARDS / "rpi4", override=load_profile_file(profiles_dir / "myboard.toml"))
    assert by_name.profile == by_file.profile == "myboard"
    assert by_name.candidates == by_file.candidates
    assert by_name.source == "override" and "rpi4" in by_name.reason


def _bad(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


BAD_FILES = {
    "not TOML": (_bad(MYBOARD, 'memory_class = "small"', "memory_class = "), "not valid TOML"),
    "unknown delegate": (
        _bad(MYBOARD, 'delegate = "xnnpack"\nprecision = "fp32"', 'delegate = "xnnpak"\nprecision = "fp32"'),
        "[[candidates]] #2: litert delegate 'xnnpak' is not one of edgetpu, gpu, xnnpack",
    ),
    "misspelt key": (_bad(MYBOARD, "threads = 2", "threds = 2"), "[[candidates]] #1 threds: Extra inputs"),
    "bad precision": (
        _bad(MYBOARD, 'precision = "int8"', 'precision = "int4"'),
        "[[candidates]] #1 precision: Input should be 'fp32', 'fp16' or 'int8'",
    ),
    "no memory class": (_bad(MYBOARD, 'memory_class = "small"\n', ""), "a board profile needs memory_class"),
    "no candidates": (MYBOARD.split("[[candidates]]")[0], "candidates: Field required"),
    "bad threads": (
        _bad(MYBOARD, "threads = 2", "threads = 0"),
        "[[candidates]] #1 threads: Input should be",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_profile_file_is_one_line_naming_file_and_field(profiles_dir: Path, case: str) -> None:
    text, expected = BAD_FILES[case]
    path = profiles_dir / "myboard.toml"
    path.write_text(text)
    for load in (lambda: load_profile("myboard", profiles_dir), lambda: load_profile_file(path)):
        with pytest.raises(ProfileInvalid) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"profile file {path}: "), message
        assert expected in message and "\n" not in message, message


def test_name_must_match_the_file_name_in_a_folder(profiles_dir: Path) -> None:
    (profiles_dir / "other.toml").write_text(MYBOARD)
    with pytest.raises(ProfileInvalid, match=r"other.toml: name: 'myboard' differs from the file name"):
        load_profile("other", profiles_dir)
    assert load_profile_file(profiles_dir / "other.toml").name == "myboard"  # any name with --profile-file


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileInvalid, match=r"^profile file .*nope.toml: no such file$"):
        load_profile_file(tmp_path / "nope.toml")


def test_detect_cli_with_a_profile_file(profiles_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = profiles_dir / "myboard.toml"
    assert edgeagent("detect", "--root", BOARDS / "rpi4", "--profile-file", good, "--json") == 0
    detection = json.loads(capsys.readouterr().out)
    assert detection["profile"] == "myboard" and len(detection["candidates"]) == 2
    bad = profiles_dir / "bad.toml"
    bad.write_text(BAD_FILES["unknown delegate"][0])
    assert edgeagent("detect", "--root", BOARDS / "rpi4", "--profile-file", bad) == 2  # input: docs/cli.md
    err = capsys.readouterr().err
    assert (
        err.startswith(f"edgeagent: error: profile file {bad}: [[candidates]] #2:") and err.count("\n") == 1
    )


def test_detect_cli_finds_local_profiles_by_name(
    profiles_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ["--root", BOARDS / "rpi4"]
    assert edgeagent("detect", *root, "--profile", "myboard", "--profiles-dir", profiles_dir) == 0
    assert "profile       myboard  [override]" in capsys.readouterr().out
    assert edgeagent("detect", *root, "--profile", "myboard", "--profiles-dir", profiles_dir.parent) == 2
    assert "unknown device profile 'myboard'" in capsys.readouterr().err


def test_profile_and_profile_file_exclude_each_other(profiles_dir: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        edgeagent("detect", "--profile", "rpi4", "--profile-file", profiles_dir / "myboard.toml")
    assert exited.value.code == 2


def test_agent_config_knows_local_profiles(profiles_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'profiles_dir = "{profiles_dir}"\nprofile = "myboard"\n')
    loaded = load_config(config, environ={})
    assert loaded.profile == "myboard"
    detection = detect(BOARDS / "rpi4", override=loaded.profile, profiles_dir=loaded.profiles_dir)
    assert detection.profile == "myboard"
    with pytest.raises(ConfigError, match=r"profile: unknown device profile 'myboard'"):
        load_config(config, environ={"EDGEAGENT_PROFILES_DIR": str(tmp_path / "elsewhere")})


def test_every_shipped_litert_cpu_profile_serves_fp16_weight_artifacts() -> None:
    """A bundle carrying only fp16-weight TFLite (MediaPipe's models) must find a candidate
    wherever LiteRT runs fp32 on the CPU: LiteRT widens fp16 weights to fp32 at load."""
    for name in list_profiles():
        keys = {c.key for c in load_profile(name).candidates}
        for runtime, delegate, precision, loads in list(keys):
            if (runtime, delegate, precision, loads) == ("litert", "xnnpack", "fp32", "fp32"):
                assert ("litert", "xnnpack", "fp32", "fp16") in keys, name


def test_the_agent_does_not_start_on_a_bad_profile_file(profiles_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = profiles_dir / "myboard.toml"
    bad.write_text(BAD_FILES["misspelt key"][0])
    config = tmp_path / "agent.toml"
    config.write_text(
        f'profiles_dir = "{profiles_dir}"\nprofile = "myboard"\nstate_dir = "{tmp_path / "state"}"\n'
        f'socket_path = "{tmp_path / "agent.sock"}"\n'
    )
    assert edgeagent("run", "--config", config) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"edgeagent: error: profile file {bad}: [[candidates]] #1 threds: Extra inputs are not permitted"
    ]
    assert not (tmp_path / "agent.sock").exists()
