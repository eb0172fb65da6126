"""Episode video: `VideoRecorder(path, fps=30)`, `.add(frame)` per step, `.close()` writes an MP4.

Frames are HxWx3 uint8 arrays, as every flatworld env's `render()` returns them. The file
appears only when `close()` succeeds (written to a temporary file beside it, then renamed),
so a crash mid-episode never leaves a truncated video under the requested name. Encoding is
imageio with its bundled ffmpeg (`pip install 'flatworld[video]'`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from flatworld.envs.gym_suite import MissingDependencyError

VIDEO_PIP = "pip install 'flatworld[video]'"


class VideoRecorder:
    """Write frames to an MP4 at `path` (H.264). Use as a context manager, or call `close()`.

    Every frame keeps its exact size: sizes that H.264's usual 4:2:0 pixel format cannot hold
    (an odd height or width) are written as 4:4:4 instead of being rescaled.
    """

    def __init__(self, path: str | os.PathLike[str], fps: int = 30) -> None:
        if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
            raise ValueError(f"fps={fps!r}: expected an int >= 1")
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"video path {str(path)!r}: expected a file name ending in .mp4")
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio's writer runs)
        except ImportError as err:
            raise MissingDependencyError(
                f"writing video needs imageio and imageio-ffmpeg: {VIDEO_PIP}"
            ) from err
        self._imageio = imageio
        self.fps = fps
        self.frames = 0
        self._shape: tuple[int, ...] | None = None
        self._writer: Any = None
        self._tmp: Path | None = None

    def add(self, frame: np.ndarray) -> None:
        """Append one HxWx3 uint8 frame; every frame must have the first one's size."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"video frame of shape {frame.shape} and dtype {frame.dtype}: "
                             "expected an HxWx3 uint8 array (env.render())")  # fmt: skip
        if self._shape is None:
            self._open(frame.shape)
        elif self._writer is None:
            raise ValueError(f"{self.path}: the recorder is closed; start a new VideoRecorder")
        elif frame.shape != self._shape:
            raise ValueError(f"video frame of shape {frame.shape}: this video's frames are "
                             f"{self._shape} (one size per file)")  # fmt: skip
        self._writer.append_data(np.ascontiguousarray(frame))
        self.frames += 1

    def _open(self, shape: tuple[int, ...]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.mp4",
                                   dir=self.path.parent)  # fmt: skip
        os.close(fd)
        self._tmp, self._shape = Path(tmp), shape
        height, width = shape[:2]
        even = height % 2 == 0 and width % 2 == 0
        self._writer = self._imageio.get_writer(
            self._tmp, format="FFMPEG", mode="I", fps=self.fps, codec="libx264",
            pixelformat="yuv420p" if even else "yuv444p",
            # imageio would otherwise rescale frames to a multiple of 16 pixels.
            macro_block_size=1, ffmpeg_log_level="error",
        )  # fmt: skip

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path. Raises if no frame came."""
        if self._writer is None:
            raise ValueError(f"{self.path}: no frames were added, so no video was written")
        writer, self._writer = self._writer, None
        try:
            writer.close()
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
        finally:
            self._discard()
        return self.path

    def _discard(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001  (already failing; the first error is the one to see)
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> VideoRecorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if exc_type is None:
            self.close()
        else:  # a failed episode leaves no video behind
            self._discard()


def check_renders(env: Any, env_id: str) -> None:
    """Fail now, in one line, where `env` cannot draw frames here: before a run writes its
    folder or an evaluation plays its episodes, not at the first video. Resets `env` once."""
    from gymnasium.error import DependencyNotInstalled

    try:
        env.reset(seed=0)
        env.render()
    except (ImportError, DependencyNotInstalled) as err:
        raise MissingDependencyError(f"{env_id} cannot draw video frames here: {err}") from err
    except Exception as err:  # a renderer that does not start: GL, display
        raise ValueError(
            f"{env_id} cannot draw video frames here ({type(err).__name__}: {err}); MuJoCo "
            "tasks render headless with MUJOCO_GL=egl (libegl1) or MUJOCO_GL=osmesa"
        ) from err
