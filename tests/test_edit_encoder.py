"""Which encoder writes the segments: NVENC where the GPU's encoder can, the CPU's everywhere else."""

from fractions import Fraction

import pytest

from pipelines.edit import compose
from pipelines.edit.settings import EditSettings
from pipelines.media.formats import choose_output
from pipelines.media.video import VideoInfo, encoder_opens


def info(**fields) -> VideoInfo:
    return VideoInfo(**{"path": "source.mp4", "width": 1920, "height": 1080, "duration_s": 4.0,
                        "time_base": Fraction(1, 30000), "average_rate": Fraction(30000, 1001), "codec": "h264",
                        "pix_fmt": "yuv420p", **fields})


def test_nvenc_takes_progressive_h264_and_hevc_at_the_same_format_and_quality():
    for codec in ("h264", "hevc"):
        chosen = choose_output(info(codec=codec), "mp4", crf=21, preset="veryfast", nvenc=True)
        cpu = choose_output(info(codec=codec), "mp4", crf=21, preset="veryfast")
        assert chosen.encoder == f"{codec}_nvenc" and cpu.encoder != chosen.encoder
        assert (chosen.codec, chosen.pix_fmt, chosen.width, chosen.height) == (cpu.codec, cpu.pix_fmt, 1920, 1080)
        assert chosen.options["cq"] == "21" and chosen.options["bf"] == "0" and chosen.options["preset"] == "p3"
        assert chosen.notes == ()


@pytest.mark.parametrize("fields,reason", [({"field_order": "tt"}, "interlaced"),
                                           ({"pix_fmt": "yuv422p"}, "does not take yuv422p"),
                                           ({"codec": "vp9"}, "vp9 has no GPU encoder"),
                                           ({"codec": "hevc", "pix_fmt": "yuv420p10le", "hdr_mastering": "G(1,1)"},
                                            "HDR mastering")])
def test_what_nvenc_cannot_write_is_encoded_on_the_cpu_with_the_reason(fields, reason):
    chosen = choose_output(info(**fields), "matroska" if fields.get("codec") == "vp9" else "mp4", nvenc=True)
    assert not chosen.encoder.endswith("_nvenc")
    assert any(reason in note for note in chosen.notes), chosen.notes


def test_without_nvenc_here_auto_and_nvenc_fall_back_to_the_cpu_encoder(tmp_path):
    if encoder_opens("h264_nvenc"):
        pytest.skip("NVENC opens on this machine")
    source = info()
    for choice in ("auto", "cpu", "nvenc"):
        settings = EditSettings(output=str(tmp_path), checkpoint="unused", encoder=choice)
        chosen = compose.output_format(source, "out.mp4", settings)
        assert chosen.encoder == "libx264" and chosen.options["preset"] == "veryfast"
        assert any("does not open" in note for note in chosen.notes) == (choice == "nvenc")
    assert encoder_opens("libx264") and not encoder_opens("no_such_encoder")


def test_detectors_use_a_gpu_only_where_ray_gave_one(ray_cluster, monkeypatch):
    import ray

    def device_if_cuda_were_present() -> str:  # defined here: pickled by value, not imported by the worker
        import torch

        torch.cuda.is_available = lambda: True  # this worker process only: as on a GPU node
        return compose.worker_device()

    assert ray.get(ray.remote(num_cpus=0.1, max_calls=1)(device_if_cuda_were_present).remote()) == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert compose.worker_device() == "cuda"  # the driver, or a process outside Ray
