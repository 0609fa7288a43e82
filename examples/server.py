"""pycfg.Engine inside your own ASGI app (FastAPI here); `pycfg serve` is the complete OpenAI-compatible server.

    uvicorn examples.server:app --port 8000        # needs: pip install 'pycfg[serve]'
"""

import base64
import contextlib
import functools
import io

import torch
from fastapi import FastAPI

import pycfg
from pycfg.tiny import qwenimage_pipeline


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    # one engine per server process: its workers start with the app and stop with it
    factory = functools.partial(qwenimage_pipeline, "tiny", text_encoder=True)  # picklable: built in each worker
    with pycfg.Engine(factory, cfg_parallel_size=2, auto_restart=True) as app.state.engine:
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/generate")
async def generate(prompt: str, seed: int = 0, steps: int = 4, size: int = 128) -> dict:
    out = await app.state.engine.agenerate(prompt=prompt, negative_prompt="blurry", true_cfg_scale=4.0, height=size,
                                           width=size, num_inference_steps=steps,
                                           generator=torch.Generator().manual_seed(seed))
    buf = io.BytesIO()
    out.images[0].save(buf, format="PNG")
    return {"png_base64": base64.b64encode(buf.getvalue()).decode()}
