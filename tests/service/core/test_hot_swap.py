"""Hot swaps from a model repository under steady REST + gRPC stream load (real uvicorn and gRPC servers).

Version 2 is published while two REST clients and one stream run: no request fails, each client
switches from version 1 to version 2 exactly once, stream frames come back in order. A corrupt
version 3 (NaN weights) and 4 (a renamed state-dict key) are rejected and reported while version 2
keeps serving; a truncated file is never even a version. Pinning version 1 in the manifest rolls
back. The reload endpoint (REST and gRPC) acts without waiting for the poller.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from ditepose.model.repository import ModelManifest, write_manifest
from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc
from ditepose.service.http.deps import context_of
from tests.service.conftest import assert_error
from tests.service.core.swap_support import (
    HEADERS,
    METADATA,
    RestLoad,
    StreamLoad,
    model_entry,
    publish,
    repository_settings,
    serving,
    versions_in_order,
    wait_for,
)

POLL_S = 0.5
# A swap loads, builds and checks the new version while two clients and a stream keep the 2 shared
# CPU cores busy: this margin bounds the wait, it is not a latency claim.
LOAD_MARGIN_S = 60.0


def _stream_in_order(stream: StreamLoad) -> list[str]:
    seqs = [r.sequence_number for r in stream.results]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "stream results out of order"
    assert seqs == stream.sent[: len(seqs)], "a stream frame is missing or extra"
    errors = [(r.sequence_number, r.error.code, r.error.message) for r in stream.results if r.error.code]
    assert errors == [], errors
    runs: list[str] = []
    for r in stream.results:
        if not runs or runs[-1] != r.model_version:
            runs.append(r.model_version)
    return runs


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_publish_swap_reject_and_roll_back_under_load(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    model_dir = repository / "pose"
    assert publish(model_dir, seed=1) == 1
    settings = repository_settings(repository, repository_poll_s=POLL_S)
    with serving(settings) as (live, grpc_server), live.client(headers=HEADERS) as client:
        assert model_entry(client, "pose")["version"] == "1"
        rest = RestLoad(live.url, "pose").start()
        stream = StreamLoad(f"127.0.0.1:{grpc_server.port}", "pose").start()
        try:
            wait_for(lambda: len(rest.all()) >= 10 and len(stream.results) >= 10, 120, "traffic on version 1")

            # --- version 2: switch with zero failures, once per client, within one poll (+ load margin)
            published = time.time()
            assert publish(model_dir, seed=2) == 2
            wait_for(lambda: all(mine and mine[-1].version == "2" for mine in rest.answers) and
                     stream.results[-1].model_version == "2", POLL_S + LOAD_MARGIN_S, "version 2 everywhere")
            entry = model_entry(client, "pose")
            assert entry["version"] == "2" and entry["available_versions"] == [1, 2] and entry["state"] == "serving"
            first_v2 = min(a.received for a in rest.all() if a.version == "2")
            assert first_v2 - published <= POLL_S + LOAD_MARGIN_S
            for mine in rest.answers:  # an atomic switch: 1...1 then 2...2 for each sequential client
                assert versions_in_order(mine) == ["1", "2"]
            # every request sent after the first answer from version 2 was answered by version 2
            assert all(a.version == "2" for a in rest.all() if a.sent > first_v2)
            assert _stream_in_order(stream) == ["1", "2"]
            assert rest.failures() == []

            # --- corrupt versions: reported, version 2 keeps serving, still zero failures
            (model_dir / "9").mkdir()
            (model_dir / "9" / "checkpoint.pth").write_bytes((model_dir / "2" / "checkpoint.pth").read_bytes()[:4096])
            assert publish(model_dir, seed=3, corrupt="nan") == 10
            wait_for(lambda: "10" in model_entry(client, "pose").get("failed_versions", {}),
                     POLL_S + LOAD_MARGIN_S, "version 10 (NaN weights) rejected")
            assert publish(model_dir, seed=4, corrupt="keys") == 11
            wait_for(lambda: "11" in model_entry(client, "pose").get("failed_versions", {}),
                     POLL_S + LOAD_MARGIN_S, "version 11 (wrong keys) rejected")
            entry = model_entry(client, "pose")
            assert entry["version"] == "2"
            assert "not finite" in entry["failed_versions"]["10"]
            assert "_renamed" in entry["failed_versions"]["11"] or "key" in entry["failed_versions"]["11"].lower()
            assert entry["error"].startswith("version 11:")
            assert entry["available_versions"] == [1, 2, 10, 11]  # the truncated 9 is not a version at all
            ready = client.get("/readyz").json()
            assert ready["ready"] is True
            assert ready["model_versions"]["pose"]["served_version"] == "2"
            assert ready["model_versions"]["pose"]["error"].startswith("version 11:")
            metrics = client.get("/metrics").text
            assert _metric(metrics, "ditepose_model_load_failures_total", model="pose", version="10") == 1.0
            assert _metric(metrics, "ditepose_model_load_failures_total", model="pose", version="11") == 1.0
            assert _metric(metrics, "ditepose_model_swaps_total", model="pose") == 1.0
            before = len(rest.all())
            wait_for(lambda: len(rest.all()) >= before + 10, 120, "traffic after the rejections")
            assert {a.version for a in rest.all()[before:]} == {"2"}
            assert rest.failures() == []

            # --- roll back: pin version 1 in the manifest
            pinned = time.time()
            write_manifest(model_dir, ModelManifest(version=1))
            wait_for(lambda: all(mine[-1].version == "1" for mine in rest.answers) and
                     stream.results[-1].model_version == "1", POLL_S + LOAD_MARGIN_S, "the roll back to 1")
            entry = model_entry(client, "pose")
            assert entry["version"] == "1" and entry["pinned_version"] == 1
            first_back = min(a.received for a in rest.all() if a.version == "1" and a.sent > pinned)
            assert first_back - pinned <= POLL_S + LOAD_MARGIN_S
            for mine in rest.answers:
                assert versions_in_order(mine) == ["1", "2", "1"]
        finally:
            rest.stop()
            stream.stop()
        assert stream.error is None, stream.error
        assert _stream_in_order(stream) == ["1", "2", "1"]
        assert rest.failures() == [], rest.failures()[:3]
        metrics = client.get("/metrics").text
        assert _metric(metrics, "ditepose_model_swaps_total", model="pose") == 2.0
        served = {v: _metric(metrics, "ditepose_model_requests_total", model="pose", version=v, outcome="ok")
                  for v in ("1", "2")}
        assert served["1"] > 0 and served["2"] > 0
        assert served["1"] + served["2"] == len(rest.all()) + len(stream.results)
        print(f"\nswap under load: {len(rest.all())} REST requests, {len(stream.results)} stream frames, "
              f"0 failures; version 2 first answered {first_v2 - published:.2f} s after publishing, "
              f"version 1 again {first_back - pinned:.2f} s after pinning (poll {POLL_S} s)")


def test_reload_endpoints_key_unknown_model_and_grpc(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    model_dir = repository / "pose"
    publish(model_dir, seed=1)
    # The poller waits an hour: only the reload calls can bring version 2 and 3 in.
    settings = repository_settings(repository, repository_poll_s=3600)
    with serving(settings) as (live, grpc_server), live.client() as client:
        assert_error(client.post("/v1/models/pose/reload"), 401, "unauthorized")
        assert_error(client.post("/v1/models/pose/reload", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        body = assert_error(client.post("/v1/models/nope/reload", headers=HEADERS), 404, "unknown_model")
        assert "nope" in body["error"]["message"]

        same = client.post("/v1/models/pose/reload", headers=HEADERS)
        assert same.status_code == 200, same.text
        assert same.json()["swapped"] is False
        assert same.json()["served_version"] == "1"

        publish(model_dir, seed=2)
        assert model_entry(client, "pose")["version"] == "1"  # not polled
        swapped = client.post("/v1/models/pose/reload", headers=HEADERS).json()
        assert swapped["swapped"] is True and swapped["previous_version"] == "1"
        assert swapped["served_version"] == "2" and swapped["available_versions"] == [1, 2]

        with grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            with pytest.raises(grpc.RpcError) as denied:
                stub.ReloadModel(pose_pb2.ReloadModelRequest(name="pose"))
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as unknown:
                stub.ReloadModel(pose_pb2.ReloadModelRequest(name="nope"), metadata=METADATA)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert dict(unknown.value.trailing_metadata())["ditepose-error-code"] == "unknown_model"

            publish(model_dir, seed=3, corrupt="nan")
            rejected = stub.ReloadModel(pose_pb2.ReloadModelRequest(name="pose"), metadata=METADATA)
            assert rejected.swapped is False and rejected.model.version == "2"
            assert "3" in rejected.model.failed_versions and "not finite" in rejected.model.error

            write_manifest(model_dir, ModelManifest(version=1))
            back = stub.ReloadModel(pose_pb2.ReloadModelRequest(name="pose"), metadata=METADATA)
            assert back.swapped is True and back.previous_version == "2" and back.model.version == "1"
            assert back.model.pinned_version == 1 and list(back.model.available_versions) == [1, 2, 3]

            listed = stub.ListModels(pose_pb2.ListModelsRequest(), metadata=METADATA)
            (info,) = listed.models
            assert info.name == "pose" and info.version == "1" and info.source == "repository"
            assert info.state == "serving" and "3" in info.failed_versions

            frame_image, box = _image_and_box()
            request = pose_pb2.EstimateRequest(image=frame_image, options=pose_pb2.PoseOptions(model="pose"))
            request.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
            assert stub.Estimate(request, metadata=METADATA).model_version == "1"


def _image_and_box() -> tuple[bytes, list[float]]:
    from tests.service.core.swap_support import figure_jpeg

    return figure_jpeg()


def test_a_running_service_picks_up_what_train_publish_produced(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from ditepose.cli import main
    from tests.training.conftest import TINY, synth_set

    repository = tmp_path / "repository"
    publish(repository / "other", seed=1)  # the service needs one model to start with
    data = synth_set(tmp_path_factory, "swap_publish_data", 3, 2, 21)
    settings = repository_settings(repository, repository_poll_s=POLL_S)
    with serving(settings) as (live, _grpc), live.client(headers=HEADERS) as client:
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["other"]
        # The training tests' smallest run (one epoch, one validation: one best checkpoint).
        code = main(["train", "dite_hrnet_18", "--data", str(data), "--work-dir", str(tmp_path / "run"),
                     "--epochs", "1", "--global-batch", "4", "--input", "64x64", "--workers", "0",
                     "--eval-every", "1", "--max-people", "4", "--quiet", "--model-overrides", json.dumps(TINY),
                     "--publish", str(repository / "pose")])
        assert code == 0
        wait_for(lambda: any(m["name"] == "pose" for m in client.get("/v1/models").json()["models"]),
                 POLL_S + LOAD_MARGIN_S, "the published model")
        entry = model_entry(client, "pose")
        assert entry["version"] == "1" and entry["source"] == "repository" and entry["available_versions"] == [1]
        assert entry["input_size"] == [64, 64]
        image, box = _image_and_box()
        r = client.post("/v1/pose", files={"image": ("f.jpg", image, "image/jpeg")},
                        data={"boxes": json.dumps([box]), "model": "pose"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "pose" and r.json()["model_version"] == "1"
        assert len(r.json()["persons"]) == 1


def test_input_size_and_serving_options_change_between_versions_under_load(tmp_path: Path) -> None:
    """Version 2 has another input size: requests that took version 1 finish with its crops, new
    ones are cut for version 2, none fails. A manifest edit of serving options alone swaps too."""
    repository = tmp_path / "repository"
    model_dir = repository / "pose"
    publish(model_dir, seed=1, size=(64, 64))
    settings = repository_settings(repository, repository_poll_s=POLL_S)
    with serving(settings) as (live, grpc_server), live.client(headers=HEADERS) as client:
        rest = RestLoad(live.url, "pose").start()
        stream = StreamLoad(f"127.0.0.1:{grpc_server.port}", "pose").start()
        try:
            wait_for(lambda: len(rest.all()) >= 6 and len(stream.results) >= 6, 120, "traffic on version 1")
            publish(model_dir, seed=2, size=(64, 96))  # (W, H): taller crops
            wait_for(lambda: all(mine and mine[-1].version == "2" for mine in rest.answers) and
                     stream.results[-1].model_version == "2", POLL_S + LOAD_MARGIN_S, "version 2")
            assert model_entry(client, "pose")["input_size"] == [64, 96]

            write_manifest(model_dir, ModelManifest(max_batch_size=3, flip_test=False, decoder="dark"))
            wait_for(lambda: model_entry(client, "pose")["options"].get("max_batch_size") == 3,
                     POLL_S + LOAD_MARGIN_S, "the manifest's serving options")
            entry = model_entry(client, "pose")
            assert entry["version"] == "2"
            assert entry["options"] == {"flip_test": False, "decoder": "dark", "max_batch_size": 3}
            assert live.pool.batcher("pose").max_batch_size == 3
            # a request that leaves flip_test and decoder out gets the manifest's (no flip, DARK)
            image, box = _image_and_box()
            plain = client.post("/v1/pose", files={"image": ("f.jpg", image, "image/jpeg")},
                                data={"boxes": json.dumps([box]), "model": "pose"})
            assert plain.status_code == 200 and plain.json()["model_version"] == "2"
            service = context_of(live.app).service
            assert ("pose", "2", (64, 96), False, "dark") in service._pipelines
            before = len(rest.all())
            wait_for(lambda: len(rest.all()) >= before + 6, 120, "traffic with the new options")
        finally:
            rest.stop()
            stream.stop()
        assert stream.error is None, stream.error
        assert rest.failures() == [], rest.failures()[:3]
        assert _stream_in_order(stream) == ["1", "2"]
        for mine in rest.answers:
            assert versions_in_order(mine) == ["1", "2"]
        metrics = client.get("/metrics").text
        assert _metric(metrics, "ditepose_model_swaps_total", model="pose") == 2.0
