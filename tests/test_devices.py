"""Device profiles and hardware detection, on fake root filesystems built from real boards' files.

The board trees live in tests/fixtures/boards/<case>/ (their sources: README.md there);
each test copies one into tmp_path and adds what the case needs (a Coral on USB, a
missing device tree) so the checked-in trees stay as the boards show them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from devices.detect import Detection, Evidence, detect
from devices.errors import DetectionError, DeviceError, UnknownProfile
from devices.profile import (
    Candidate,
    Profile,
    list_profiles,
    load_profile,
    memory_class_for,
    resolve_candidates,
)
from edgeagent.cli.agent import main as agent_main
from edgeagent.errors import EdgeError

BOARDS = Path(__file__).parent / "fixtures" / "boards"
ALL_PROFILES = {
    "rpi3",
    "rpi4",
    "rpi5",
    "jetson-nano",
    "jetson-xavier-nx",
    "jetson-orin",
    "coral-devboard",
    "coral-usb",
    "generic-arm64",
    "generic-x86_64",
}


def board(tmp_path: Path, case: str) -> Path:
    """A copy of the fixture tree ``case`` that a test may add files to."""
    root = tmp_path / case
    shutil.copytree(BOARDS / case, root, symlinks=True)
    return root


def add(root: Path, rel: str, data: str | bytes = b"") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def plug_usb(root: Path, port: str, vid_pid: str) -> None:
    vendor, product = vid_pid.split(":")
    add(root, f"sys/bus/usb/devices/{port}/idVendor", vendor + "\n")
    add(root, f"sys/bus/usb/devices/{port}/idProduct", product + "\n")


# --- profiles -------------------------------------------------------------------------------


def test_every_profile_loads_and_the_set_is_complete() -> None:
    assert set(list_profiles()) == ALL_PROFILES
    for name in list_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.candidates, name


def test_every_profile_explains_its_order_in_a_comment() -> None:
    for name in list_profiles():
        text = (BOARDS.parents[2] / "devices" / "profiles" / f"{name}.toml").read_text()
        assert "Order and why" in text or "why:" in text.lower(), f"{name}.toml does not explain its order"


@pytest.mark.parametrize("model", [Profile, Candidate, Evidence, Detection])
def test_every_schema_field_is_described(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert missing == [], f"{model.__name__} fields without a description: {missing}"


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("rpi4", "litert/xnnpack/int8"),
        ("jetson-nano", "onnxruntime/TensorrtExecutionProvider/fp16 (from fp32)"),
        ("jetson-orin", "onnxruntime/TensorrtExecutionProvider/int8"),
        ("coral-devboard", "litert/edgetpu/int8"),
        ("coral-usb", "litert/edgetpu/int8"),
        ("generic-x86_64", "onnxruntime/CPUExecutionProvider/int8"),
    ],
)
def test_first_candidate_is_the_documented_policy(name: str, first: str) -> None:
    assert str(load_profile(name).candidates[0]) == first


def test_jetson_nano_has_no_tensorrt_int8_because_maxwell_lacks_it() -> None:
    keys = {str(c) for c in load_profile("jetson-nano").candidates}
    assert "onnxruntime/TensorrtExecutionProvider/int8" not in keys


def test_accessory_candidates_come_first_then_the_host_without_repeats() -> None:
    resolved = resolve_candidates(load_profile("coral-usb"), load_profile("coral-devboard"))
    assert [str(c) for c in resolved] == [str(c) for c in load_profile("coral-devboard").candidates]
    on_pi = resolve_candidates(load_profile("coral-usb"), load_profile("rpi4"))
    assert on_pi[0].delegate == "edgetpu"
    assert on_pi[1:] == load_profile("rpi4").candidates


BASE = {"runtime": "litert", "delegate": "xnnpack", "precision": "int8"}


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({**BASE, "delegate": "nnapi"}, "litert delegate 'nnapi' is not one of"),
        ({**BASE, "runtime": "onnxruntime", "delegate": "CudaExecutionProvider"}, "onnxruntime provider"),
        ({**BASE, "delegate": "edgetpu"}, "artifact_suffix = '_edgetpu.tflite'"),
        ({**BASE, "delegate": "edgetpu", "precision": "fp32", "artifact_suffix": "_edgetpu.tflite"}, "int8"),
        ({**BASE, "artifact_suffix": "_x.onnx"}, "must end with '.tflite'"),
        ({**BASE, "threads": 0}, "greater than or equal to 1"),
        ({**BASE, "options": {"x": 1}}, "Extra inputs are not permitted"),
    ],
)
def test_candidate_schema_refuses_with_a_precise_message(candidate: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Candidate.model_validate(candidate)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_class": None}, "a board profile needs memory_class"),
        ({"accessory": True}, "accessory profile takes its host's memory class"),
        ({"candidates": [BASE, BASE]}, "listed twice"),
        ({"candidates": []}, "at least 1"),
        ({"architectures": ["armv7l"]}, "aarch64"),
    ],
)
def test_profile_schema_refuses_with_a_precise_message(change: dict[str, object], message: str) -> None:
    data = {
        "name": "x",
        "description": "x",
        "architectures": ["aarch64"],
        "memory_class": "small",
        "candidates": [BASE],
        **change,
    }
    with pytest.raises(ValidationError, match=message):
        Profile.model_validate(data)


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(UnknownProfile, match=r"unknown device profile 'rpi9' \(known: coral-devboard"):
        load_profile("rpi9")


def test_device_errors_are_edge_errors_so_the_cli_prints_one_line() -> None:
    assert issubclass(DeviceError, EdgeError)


@pytest.mark.parametrize(("mib", "cls"), [(909, "small"), (1535, "small"), (3793, "medium"), (7619, "large")])
def test_memory_class_boundaries(mib: int, cls: str) -> None:
    assert memory_class_for(mib) == cls


# --- detection of every board -----------------------------------------------------------------

# case -> (profile, evidence that must decide it, cpus, MemTotal MiB, accelerators, libraries)
BOARD_CASES = {
    "rpi3": ("rpi3", "compatible 'raspberrypi,3-model-b-plus'", 4, 888, [], []),
    "rpi4": ("rpi4", "compatible 'raspberrypi,4-model-b'", 4, 3793, [], []),
    "rpi5": ("rpi5", "compatible 'raspberrypi,5-model-b'", 4, 8051, [], []),
    "jetson-nano": (
        "jetson-nano",
        "compatible 'nvidia,p3450-0000'",
        4,
        3956,
        ["nvidia-gpu"],
        ["libcudart.so", "libnvinfer.so"],
    ),
    "jetson-xavier-nx": (
        "jetson-xavier-nx",
        "compatible 'nvidia,tegra194'",
        6,
        7583,
        ["nvidia-gpu"],
        ["libcudart.so", "libnvinfer.so"],
    ),
    "jetson-orin": (
        "jetson-orin",
        "compatible 'nvidia,tegra234'",
        6,
        7619,
        ["nvidia-gpu"],
        ["libcudart.so", "libnvinfer.so"],
    ),
    "coral-devboard": (
        "coral-devboard",
        "compatible 'google,imx8mq-phanbell'",
        4,
        977,
        ["edgetpu-pcie"],
        ["libedgetpu.so.1"],
    ),
    "generic-arm64": ("generic-arm64", "generic profile for aarch64", 8, 7767, [], []),
    "generic-x86_64": ("generic-x86_64", "generic profile for x86_64", 4, 7806, [], []),
}


@pytest.mark.parametrize("case", sorted(BOARD_CASES))
def test_each_board_tree_detects_its_profile(case: str) -> None:
    profile, because, cpus, mib, accelerators, libraries = BOARD_CASES[case]
    detection = detect(BOARDS / case)
    assert detection.profile == profile
    assert because in detection.reason
    assert detection.source == ("fallback" if profile.startswith("generic") else "detected")
    assert detection.host_profile is None
    assert detection.evidence.cpu_count == cpus
    assert detection.evidence.mem_total_mib == mib
    assert detection.accelerators == accelerators
    assert sorted(detection.evidence.libraries) == libraries
    assert detection.candidates == load_profile(profile).candidates
    assert detection.notes == []


def test_every_board_profile_has_a_fixture_tree() -> None:
    boards = {name for name in list_profiles() if not load_profile(name).accessory}
    assert boards == {expected[0] for expected in BOARD_CASES.values()}


def test_detection_is_json_serialisable_and_round_trips() -> None:
    detection = detect(BOARDS / "jetson-orin")
    body = json.loads(detection.model_dump_json())
    assert body["profile"] == "jetson-orin"
    assert body["evidence"]["l4t_release"] == "R36.4.0"
    assert body["evidence"]["model"] == "NVIDIA Jetson Orin Nano Developer Kit"  # trailing NUL gone
    assert Detection.model_validate_json(detection.model_dump_json()) == detection


def test_model_string_decides_when_there_is_no_compatible(tmp_path: Path) -> None:
    root = board(tmp_path, "rpi3")
    (root / "proc/device-tree/compatible").unlink()
    detection = detect(root)
    assert (detection.profile, detection.reason) == (
        "rpi3",
        "device-tree model 'Raspberry Pi 3 Model B Plus Rev 1.3'",
    )


def test_cpuinfo_model_line_decides_without_a_device_tree(tmp_path: Path) -> None:
    root = board(tmp_path, "rpi5")
    shutil.rmtree(root / "proc/device-tree")
    detection = detect(root)
    assert detection.profile == "rpi5"
    assert detection.reason == "/proc/cpuinfo Model 'Raspberry Pi 5 Model B Rev 1.0'"


def test_vendor_kernel_model_of_the_coral_dev_board(tmp_path: Path) -> None:
    # Mendel's vendor kernel names the board "Freescale i.MX8MQ Phanbell".
    root = board(tmp_path, "coral-devboard")
    (root / "proc/device-tree/compatible").unlink()
    add(root, "proc/device-tree/model", "Freescale i.MX8MQ Phanbell\0")
    assert detect(root).profile == "coral-devboard"


@pytest.mark.parametrize(
    ("release", "profile"),
    [
        ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64", "jetson-nano"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "jetson-orin"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", "jetson-orin"),
        ("# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t186ref, EABI: aarch64", "generic-arm64"),
    ],
)
def test_jetson_container_without_a_device_tree_uses_nv_tegra_release(
    tmp_path: Path, release: str, profile: str
) -> None:
    root = board(tmp_path, "jetson-nano")
    shutil.rmtree(root / "sys")
    add(root, "etc/nv_tegra_release", release + "\n")
    detection = detect(root)
    assert detection.profile == profile
    # R32 on t186ref is a TX2, which has no profile of its own.
    assert ("nv_tegra_release" in detection.reason) == (profile != "generic-arm64")


def test_orin_nano_is_not_mistaken_for_a_jetson_nano(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson-orin")
    (root / "proc/device-tree/compatible").unlink()
    assert detect(root).profile == "jetson-orin"


# --- Coral USB, unknown boards, override -----------------------------------------------------


@pytest.mark.parametrize("usb_id", ["1a6e:089a", "18d1:9302"])
def test_coral_usb_on_a_pi_is_coral_usb_with_the_pi_as_host(tmp_path: Path, usb_id: str) -> None:
    root = board(tmp_path, "rpi4")
    plug_usb(root, "1-1", "1d6b:0002")  # the root hub, to show other devices do not matter
    plug_usb(root, "1-1.3", usb_id)
    add(root, "usr/lib/aarch64-linux-gnu/libedgetpu.so.1")
    detection = detect(root)
    assert (detection.profile, detection.host_profile) == ("coral-usb", "rpi4")
    assert detection.reason.startswith(f"Coral USB accelerator (USB id {usb_id}) on a rpi4 host")
    assert detection.accelerators == ["edgetpu-usb"]
    assert str(detection.candidates[0]) == "litert/edgetpu/int8"
    assert detection.candidates[1:] == load_profile("rpi4").candidates  # threads=4 kept
    assert detection.notes == []


def test_coral_usb_without_libedgetpu_says_what_to_install(tmp_path: Path) -> None:
    root = board(tmp_path, "generic-x86_64")
    plug_usb(root, "2-1", "18d1:9302")
    detection = detect(root)
    assert (detection.profile, detection.host_profile) == ("coral-usb", "generic-x86_64")
    assert detection.notes == [
        "libedgetpu.so.1 not found: install libedgetpu1-std from Coral's apt repository"
    ]


def test_m2_edge_tpu_in_a_pc_uses_the_accessory_profile(tmp_path: Path) -> None:
    root = board(tmp_path, "generic-x86_64")
    add(root, "dev/apex_0")
    add(root, "usr/lib/x86_64-linux-gnu/libedgetpu.so.1")
    detection = detect(root)
    assert (detection.profile, detection.host_profile, detection.accelerators) == (
        "coral-usb",
        "generic-x86_64",
        ["edgetpu-pcie"],
    )


def test_dev_board_keeps_its_own_profile_when_a_usb_coral_is_attached(tmp_path: Path) -> None:
    root = board(tmp_path, "coral-devboard")
    plug_usb(root, "1-1", "18d1:9302")
    detection = detect(root)
    assert detection.profile == "coral-devboard"
    assert detection.host_profile is None
    assert any("Coral USB accelerator is attached too" in note for note in detection.notes)


def test_unknown_arm_board_falls_back_to_generic_arm64() -> None:
    detection = detect(BOARDS / "generic-arm64")
    assert detection.evidence.model == "Radxa ROCK 5B"
    assert (detection.profile, detection.source) == ("generic-arm64", "fallback")


def test_32_bit_arm_pi_is_detected_and_the_mismatch_noted(tmp_path: Path) -> None:
    root = board(tmp_path, "rpi3")
    text = (root / "proc/cpuinfo").read_text().replace("CPU architecture: 8", "CPU architecture: 7")
    add(root, "proc/cpuinfo", text)
    detection = detect(root)
    assert (detection.profile, detection.architecture) == ("rpi3", "armv7l")
    assert detection.notes == ["profile rpi3 is for aarch64 but this system is armv7l"]


@pytest.mark.parametrize(
    "cpuinfo",
    ["processor\t: 0\nhart\t\t: 1\nisa\t\t: rv64imafdc\nmmu\t\t: sv39\n", ""],
    ids=["riscv64", "empty"],
)
def test_no_profile_for_an_unknown_architecture_is_one_clear_error(tmp_path: Path, cpuinfo: str) -> None:
    add(tmp_path, "proc/cpuinfo", cpuinfo)
    with pytest.raises(DetectionError, match=r"fits architecture unknown .* set profile in"):
        detect(tmp_path)


def test_override_works_where_detection_finds_no_profile(tmp_path: Path) -> None:
    add(tmp_path, "proc/cpuinfo", "processor\t: 0\nisa\t\t: rv64imafdc\n")
    detection = detect(tmp_path, override="generic-arm64")
    assert (detection.profile, detection.source) == ("generic-arm64", "override")
    assert detection.reason.startswith("set by the operator; detection alone gives no profile (")


def test_root_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DetectionError, match="is not a directory"):
        detect(tmp_path / "missing")


def test_absolute_links_in_an_image_do_not_read_the_host(tmp_path: Path) -> None:
    host_tree = tmp_path / "host-dt"
    add(host_tree, "model", "Raspberry Pi 5 Model B Rev 1.0\0")
    root = board(tmp_path, "generic-x86_64")
    (root / "proc/device-tree").symlink_to(host_tree)  # absolute, like /proc/device-tree on a Pi
    assert detect(root).profile == "generic-x86_64"


def test_rpi4_tree_is_read_through_sys_when_proc_link_is_absolute() -> None:
    assert (BOARDS / "rpi4/proc/device-tree").is_symlink()
    assert detect(BOARDS / "rpi4").evidence.model == "Raspberry Pi 4 Model B Rev 1.4"


def test_operator_override_wins_and_keeps_the_evidence() -> None:
    detection = detect(BOARDS / "rpi4", override="generic-arm64")
    assert (detection.profile, detection.source) == ("generic-arm64", "override")
    assert detection.reason == "set by the operator; detection alone gives rpi4"
    assert detection.evidence.model == "Raspberry Pi 4 Model B Rev 1.4"
    assert detection.candidates == load_profile("generic-arm64").candidates


def test_override_to_the_accessory_keeps_the_detected_board_as_host() -> None:
    detection = detect(BOARDS / "rpi5", override="coral-usb")
    assert (detection.profile, detection.host_profile) == ("coral-usb", "rpi5")
    assert len(detection.candidates) == 1 + len(load_profile("rpi5").candidates)


def test_override_with_an_unknown_profile() -> None:
    with pytest.raises(UnknownProfile):
        detect(BOARDS / "rpi4", override="pi4")


# --- edgeagent detect -------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        agent_main(argv)
    return int(exit_info.value.code or 0)


def test_detect_command_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["detect", "--root", str(BOARDS / "coral-devboard")]) == 0
    out = capsys.readouterr().out
    assert "profile" in out and "coral-devboard  [detected]" in out
    assert "1. litert       edgetpu" in out and "artifact *_edgetpu.tflite" in out
    assert "/dev/apex_0" in out


def test_detect_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["detect", "--root", str(BOARDS / "jetson-nano"), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["profile"] == "jetson-nano"
    assert body["candidates"][0]["delegate"] == "TensorrtExecutionProvider"


def test_detect_command_bad_profile_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["detect", "--root", str(BOARDS / "rpi4"), "--profile", "pi4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeagent: error: unknown device profile 'pi4'")
    assert err.count("\n") == 1
