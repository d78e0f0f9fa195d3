"""A check shared by the SD-1.5 and SDXL trainer tests (a module, not a conftest, so it can be imported)."""

import torch


def assert_lora_reloads_as_trained(trainer, base_model: str, final, prompt: str) -> None:
    """The final LoRA, reloaded into a stock pipeline, and the pool's last adapter, activated as the
    reference, both sample exactly as the trained policy does (same lora_alpha / rank scale)."""

    def sample(pipe):
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images

    with torch.no_grad():
        trained = sample(trainer.pipe)
        with trainer.reference.activate(len(trainer.pool) - 1):  # the pool's last entry is the final policy
            from_pool = sample(trainer.pipe)
        stock = type(trainer.pipe).from_pretrained(base_model)
        stock.set_progress_bar_config(disable=True)
        before = sample(stock)
        stock.load_lora_weights(str(final))
        reloaded = sample(stock)
    assert not torch.allclose(before, trained, atol=1e-3)  # training changed the samples
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_pool, trained, rtol=1e-4, atol=1e-5)
