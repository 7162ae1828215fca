"""Real-browser check of app.py: headless Chromium types a prompt, picks a patch, clicks Generate, waits for the
original | erased pair and saves a screenshot. Not a pytest module (its name does not match ``test_*.py``).

Needs Debian's chromium and chromedriver, and selenium::

    apt-get install -y chromium chromium-driver
    pip install selenium
    python tests/browser_check.py                       # tiny random pipeline (seconds)
    python tests/browser_check.py --model miniworld     # the bundled miniature world (once it is built)

Writes ``outputs/app_screenshot.png``; exits 0 when both images showed up and no error toast did.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1400"]


def tiny_setup(patch_dir: Path):
    import torch
    from tiny_models import sd_pipeline

    from erase_diffusion.patch import fingerprint, write_patch
    from erase_diffusion.patch_format import LoraFactors

    pipe = sd_pipeline()
    g = torch.Generator().manual_seed(0)
    core = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    layers = {}
    for i, layer in enumerate(core.encoder.layers):
        lin = layer.self_attn.out_proj
        layers[f"text_model.encoder.layers.{i}.self_attn.out_proj"] = LoraFactors(
            A=torch.randn(2, lin.in_features, generator=g) * 0.5, B=torch.randn(lin.out_features, 2, generator=g) * 0.5)
    write_patch(patch_dir / "erase-circle.safetensors", {"text_encoder": layers}, method="test", settings={},
                erased=["circle"], protected=[], base_model="tiny",
                fingerprints={"text_encoder": fingerprint(pipe.text_encoder)})
    return pipe


def model_setup(model: str, patch_dir: Path):
    from erase_diffusion import nullspace
    from erase_diffusion.models import load_pipeline

    pipe = load_pipeline(model)
    nullspace.erase(model, ["circle"], output=patch_dir / "erase-circle.safetensors", pipe=pipe)
    return pipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random test pipeline), 'miniworld' or a model path")
    parser.add_argument("--prompt", default="a photo of a red circle")
    parser.add_argument("--screenshot", default=str(ROOT / "outputs" / "app_screenshot.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from app import build_demo

    patch_dir = Path(tempfile.mkdtemp(prefix="app-browser-patches-"))
    pipe = tiny_setup(patch_dir) if args.model == "tiny" else model_setup(args.model, patch_dir)
    demo = build_demo(lambda: pipe, patch_dir=patch_dir, model=args.model)
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=options)
    ok = False
    try:
        t0 = time.perf_counter()
        driver.get(url)
        wait = WebDriverWait(driver, args.timeout)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys(args.prompt)
        steps = driver.find_elements(By.CSS_SELECTOR, "input[type=number][aria-label='number input for Steps']")
        if steps:  # fewer steps: faster on CPU
            steps[0].clear()
            steps[0].send_keys("4")
        patch = wait.until(EC.element_to_be_clickable((By.XPATH, "//*[@id='patches']//label[contains(., 'erase-circle')]")))
        patch.click()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: len([i for i in d.find_elements(By.CSS_SELECTOR, "#pair img")
                                  if (i.get_attribute("src") or "").strip()]) >= 2)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.0)  # let the slider render
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body.error, .toast-wrap .error")]
        Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.screenshot)
        srcs = [i.get_attribute("src") for i in driver.find_elements(By.CSS_SELECTOR, "#pair img")]
        print(f"page {url}: {len(srcs)} images in the slider after {time.perf_counter() - t0:.1f}s; "
              f"errors: {errors or 'none'}; screenshot {args.screenshot}")
        ok = len(srcs) >= 2 and not errors
    finally:
        driver.quit()
        demo.close()
    print("browser check", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
