"""A media archive in miniature, made at test time around the real talking face of the sample clip.

One file per kind of video an archive holds (each short and small, so the corpus takes seconds to
make and edit); the ffmpeg arguments are the record of how each was made. Imported by
tests/test_media_corpus.py, whose module fixture makes the corpus once.

| file | what it is |
|---|---|
| hd709.mp4 | BT.709 HD (1280x720, tagged), H.264 at 30000/1001, AAC |
| sd601.mp4 | BT.601 SD (640x480, smpte170m), H.264 |
| phone.mp4 | full-range phone video: VFR, stored turned with a 90 degree display rotation, AAC |
| hdr10.mp4 | 10-bit HEVC HDR10 (BT.2020, PQ, mastering display and light level), AAC |
| pal.ts | PAL interlaced (720x576, 16:15 pixels, top field first, real motion between fields) MPEG-2 with MP2 |
| opengop.mkv | open-GOP HEVC with B-frames, a CRA every 8 frames (many chunk starts on leading pictures) |
| editlist.mp4 | an MP4 cut with `-c copy` from a keyframe it does not show (an edit list) |
| ntsc.mov | NTSC anamorphic (720x480, 10:11 pixels) ProRes 422 with PCM audio and a drop-frame timecode |
| vp9.mkv | VP9 with Opus, two subtitle streams, an attachment, chapters, a title and stream languages |
| odd.mp4 | odd frame size (351x287) |
| long.mp4 | AV1, longer than many chunks |
| sideways.mp4 | a face stored sideways with no rotation tag (a camera held sideways, the tag lost) |
| opengop.ts | open-GOP H.264 with B-frames in MPEG-TS (for the seek property test) |
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipelines.media.video import ffmpeg_exe

KINDS = ("hd709.mp4", "sd601.mp4", "phone.mp4", "hdr10.mp4", "pal.ts", "opengop.mkv", "editlist.mp4", "ntsc.mov",
         "vp9.mkv", "odd.mp4", "long.mp4")
"""The corpus of the issue: every one must edit with its format, streams and colours kept."""

_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "16"]
_MASTERING = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,50)"

SUBTITLES = """1
00:00:00,100 --> 00:00:00,600
Hello from the archive.

2
00:00:00,700 --> 00:00:01,200
Second line.
"""

CHAPTERS = """;FFMETADATA1
title=Corpus interview

[CHAPTER]
TIMEBASE=1/1000
START=0
END=500
title=Opening

[CHAPTER]
TIMEBASE=1/1000
START=500
END=1300
title=Answer
"""


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_corpus(talk: Path, directory: Path) -> dict[str, Path]:
    """name -> path of every corpus file (and the two extra ones), made from `talk` (the sample talk.mp4:
    352x288 at 30000/1001 with a sine track)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = {name: directory / name for name in (*KINDS, "sideways.mp4", "opengop.ts")}
    src = str(talk)
    ffmpeg("-i", src, "-frames:v", "30", "-vf", "scale=-2:720,pad=1280:720:(ow-iw)/2:0,setsar=1,format=yuv420p,"
           "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709", *_X264,
           "-c:a", "aac", "-b:a", "64k", "-t", "1.0", str(d["hd709.mp4"]))
    ffmpeg("-i", src, "-frames:v", "24", "-vf", "scale=-2:480,pad=640:480:(ow-iw)/2:0,setsar=1,format=yuv420p,"
           "setparams=range=tv:color_primaries=smpte170m:color_trc=smpte170m:colorspace=smpte170m", *_X264, "-an",
           str(d["sd601.mp4"]))
    # Sensor frames stored turned (288x352) with the display rotation that shows them upright; full range;
    # every frame of the first 12, then every other one (uneven timestamps).
    turned = directory / "phone-turned.mp4"
    ffmpeg("-i", src, "-frames:v", "30", "-vf",
           r"select='lt(n\,12)+not(mod(n\,2))',transpose=1,scale=out_range=full:out_color_matrix=bt709,"
           "format=yuv420p,setparams=range=pc:color_primaries=bt709:color_trc=bt709:colorspace=bt709",
           "-fps_mode", "vfr", *_X264, "-c:a", "aac", "-b:a", "64k", "-t", "1.0", str(turned))
    ffmpeg("-display_rotation", "90", "-i", str(turned), "-c", "copy", str(d["phone.mp4"]))
    ffmpeg("-i", src, "-frames:v", "24", "-vf", "scale=-2:360,pad=640:360:(ow-iw)/2:0,format=yuv420p10le",
           "-c:v", "libx265", "-preset", "ultrafast", "-crf", "16", "-tag:v", "hvc1",
           "-x265-params", f"log-level=error:colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc:"
                           f"master-display={_MASTERING}:max-cll=1000,400",
           "-colorspace", "bt2020nc", "-color_primaries", "bt2020", "-color_trc", "smpte2084",
           "-c:a", "aac", "-b:a", "64k", "-t", "0.8", str(d["hdr10.mp4"]))
    # 50 distinct pictures a second woven into 25 interlaced frames: the two fields of a frame differ.
    ffmpeg("-i", src, "-frames:v", "40", "-vf",
           "setpts=N/50/TB,scale=720:576,setsar=16/15,tinterlace=mode=interleave_top,fieldorder=tff",
           "-r", "25", "-c:v", "mpeg2video", "-flags", "+ildct+ilme", "-q:v", "2", "-pix_fmt", "yuv420p",
           "-c:a", "mp2", "-b:a", "128k", "-t", "0.8", "-f", "mpegts", str(d["pal.ts"]))
    ffmpeg("-i", src, "-frames:v", "72", "-c:v", "libx265", "-preset", "ultrafast", "-crf", "18",
           "-x265-params", "log-level=error:keyint=8:min-keyint=8:open-gop=1:bframes=3:b-adapt=0:scenecut=0",
           "-an", str(d["opengop.mkv"]))
    full = directory / "editlist-full.mp4"
    ffmpeg("-i", src, "-frames:v", "60", *_X264, "-g", "30", "-bf", "2", "-c:a", "aac", "-b:a", "64k", "-t", "2",
           str(full))
    ffmpeg("-ss", "0.5", "-i", str(full), "-t", "1.0", "-c", "copy", str(d["editlist.mp4"]))
    ffmpeg("-i", src, "-frames:v", "24", "-vf", "scale=720:480,setsar=10/11", "-c:v", "prores_ks", "-profile:v",
           "standard", "-pix_fmt", "yuv422p10le", "-timecode", "01:00:00;00", "-c:a", "pcm_s16le", "-t", "0.8",
           str(d["ntsc.mov"]))
    subtitles = directory / "lines.srt"
    subtitles.write_text(SUBTITLES)
    chapters = directory / "chapters.txt"
    chapters.write_text(CHAPTERS)
    ffmpeg("-i", src, "-i", str(subtitles), "-i", str(subtitles), "-i", str(chapters),
           "-map", "0:v", "-map", "0:a", "-map", "1", "-map", "2", "-map_metadata", "3", "-map_chapters", "3",
           "-frames:v", "36", "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "20",
           "-b:v", "0", "-c:a", "libopus", "-b:a", "48k", "-c:s", "srt", "-metadata:s:a:0", "language=eng",
           "-metadata:s:s:0", "language=eng", "-metadata:s:s:1", "language=fra", "-metadata:s:s:1", "title=French",
           "-disposition:s:1", "forced", "-attach", str(subtitles), "-metadata:s:t", "mimetype=text/plain",
           "-t", "1.2", str(d["vp9.mkv"]))
    ffmpeg("-i", src, "-frames:v", "20", "-vf", "scale=351:287", "-c:v", "libx264", "-preset", "ultrafast", "-crf",
           "16", "-pix_fmt", "yuv444p", "-an", str(d["odd.mp4"]))
    ffmpeg("-i", src, "-frames:v", "150", "-c:v", "libsvtav1", "-preset", "12", "-crf", "30", "-pix_fmt", "yuv420p",
           "-svtav1-params", "keyint=30", "-c:a", "aac", "-b:a", "64k", "-t", "5.0", str(d["long.mp4"]))
    ffmpeg("-i", src, "-frames:v", "20", "-vf", "transpose=2", *_X264, "-an", str(d["sideways.mp4"]))
    ffmpeg("-i", src, "-frames:v", "72", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "20",
           "-x264-params", "keyint=10:min-keyint=10:open-gop=1:bframes=3:b-adapt=0:scenecut=0", "-an",
           "-f", "mpegts", str(d["opengop.ts"]))
    return d
