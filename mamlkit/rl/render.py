"""Offscreen frames of MuJoCo simulators and the animated GIF of episodes side by side (``mamlkit rl adapt
--video``).

MuJoCo draws through OpenGL. A machine without a display has it through EGL (libEGL with Mesa's software
driver) or OSMesa; the context is made here, backend by backend, rather than through ``mujoco.Renderer``, whose
backend is fixed by ``MUJOCO_GL`` when mujoco is first imported (GLFW unless set, which needs a display).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mamlkit.base.errors import UserError
from mamlkit.checkpoint import atomic_write

BACKENDS = ("egl", "osmesa")
MAX_PIXELS = 1280 * 960   # a frame's size is bounded: the GL buffer and every frame held until the GIF is written
MAX_FRAMES = 2000


def gl_context(width: int, height: int) -> tuple[Any, str]:
    """An offscreen OpenGL context, made current: EGL, else OSMesa; ``(context, backend)``.

    Raises :class:`UserError` naming what each backend said and how to install one. Mesa's software rasteriser
    starts a thread per core unless ``LP_NUM_THREADS`` says otherwise; it gets torch's thread count, the number
    the run was planned with (`--threads`), so rendering on a busy machine takes no more cores than adapting."""
    import torch

    os.environ.setdefault("LP_NUM_THREADS", str(torch.get_num_threads()))
    said = []
    for name in BACKENDS:
        try:
            module = __import__(f"mujoco.{name}", fromlist=["GLContext"])
            context = module.GLContext(width, height)
            context.make_current()
            return context, name
        except Exception as e:  # a missing library raises ImportError, OSError, AttributeError or an EGL error
            said.append(f"{name}: {type(e).__name__}: {str(e)[:200] or 'no message'}")
    raise UserError("--video: MuJoCo found no offscreen OpenGL on this machine (" + "; ".join(said) + "). Install "
                    "one (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri, or libosmesa6), or leave out "
                    "--video: the trajectory figure needs no OpenGL")


class OffscreenRenderer:
    """RGB frames ``[height, width, 3]`` (uint8) of a simulator's state from one of its model's cameras.

    ``flip``: turn the frame upside down after reading it (OpenGL reads rows bottom first). Meta-World's cameras
    are defined upside down, so its frames come out upright unflipped. One OpenGL context serves every model
    (the model's meshes and textures are uploaded again when the model changes)."""

    def __init__(self, width: int = 320, height: int = 240, camera: str | None = None, flip: bool = True):
        import mujoco

        if not (16 <= width and 16 <= height and width * height <= MAX_PIXELS):
            raise UserError(f"a frame of {width}x{height} pixels: each side >= 16, at most {MAX_PIXELS} pixels")
        self.mj, self.width, self.height, self.camera, self.flip = mujoco, width, height, camera, flip
        self.context, self.backend = gl_context(width, height)
        self.model = self.mjr = self.scene = None
        self.option, self.perturb = mujoco.MjvOption(), mujoco.MjvPerturb()
        self.viewport = mujoco.MjrRect(0, 0, width, height)

    def _use(self, model: Any) -> None:
        mj = self.mj
        if model is self.model:
            return
        if self.mjr is not None:
            self.mjr.free()
        self.mjr = mj.MjrContext(model, mj.mjtFontScale.mjFONTSCALE_150)
        mj.mjr_setBuffer(mj.mjtFramebuffer.mjFB_OFFSCREEN, self.mjr)
        self.scene, self.model = mj.MjvScene(model, maxgeom=10000), model
        self.cam = mj.MjvCamera()
        cam_id = mj.mj_name2id(model, mj.mjtObj.mjOBJ_CAMERA, self.camera) if self.camera else -1
        if cam_id >= 0:
            self.cam.type, self.cam.fixedcamid = mj.mjtCamera.mjCAMERA_FIXED, cam_id
        else:  # no such camera: the model's default free view
            mj.mjv_defaultFreeCamera(model, self.cam)

    def frame(self, model: Any, data: Any) -> np.ndarray:
        """The current state of ``data`` (of ``model``) as seen from the camera."""
        mj = self.mj
        self.context.make_current()
        self._use(model)
        mj.mjv_updateScene(model, data, self.option, self.perturb, self.cam, mj.mjtCatBit.mjCAT_ALL, self.scene)
        mj.mjr_render(self.viewport, self.scene, self.mjr)
        pixels = np.empty((self.height, self.width, 3), dtype=np.uint8)
        mj.mjr_readPixels(pixels, None, self.viewport, self.mjr)
        return np.ascontiguousarray(pixels[::-1] if self.flip else pixels)

    def close(self) -> None:
        """Free the model's GL objects and the context (now, not when the interpreter exits and the GL library
        may already be gone)."""
        if self.mjr is not None:
            self.mjr.free()
            self.mjr = None
        if self.context is not None:
            self.context.free()
            self.context = None

    def __enter__(self) -> OffscreenRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_gif(path: Path, episodes: Sequence[Sequence[np.ndarray]], labels: Sequence[Sequence[str]],
              fps: int = 25) -> int:
    """Write ``episodes`` (each a list of ``[H, W, 3]`` frames, all the same size) side by side as one animated
    GIF, each panel under its label (``labels[e][f]``: the label of episode ``e`` at frame ``f``). An episode
    shorter than another holds its last frame. Written whole or not at all; returns the number of frames."""
    from PIL import Image, ImageDraw

    if not episodes or any(not e for e in episodes):
        raise ValueError("write_gif needs at least one frame of every episode")
    n = max(len(e) for e in episodes)
    if n > MAX_FRAMES:
        raise ValueError(f"{n} frames: at most {MAX_FRAMES}")
    h, w = episodes[0][0].shape[:2]
    strip = 16
    frames = []
    for f in range(n):
        canvas = Image.new("RGB", (w * len(episodes), h + strip), "white")
        draw = ImageDraw.Draw(canvas)
        for e, frames_e in enumerate(episodes):
            i = min(f, len(frames_e) - 1)
            canvas.paste(Image.fromarray(frames_e[i]), (e * w, strip))
            draw.text((e * w + 4, 2), labels[e][i], fill="black")
        frames.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE, colors=255))
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=round(1000 / fps), loop=0))
    return n
