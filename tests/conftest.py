"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture
def image_folder():
    """A function writing a small ImageFolder under `root`: two classes ('cats', 'dogs') of coloured noise squares,
    `size` pixels (larger than the training resolution when resizing is under test), the same pixels every time."""
    def make(root, n_per_class=8, size=40):
        from PIL import Image
        g = torch.Generator().manual_seed(0)
        for c, name in enumerate(["cats", "dogs"]):
            (root / name).mkdir(parents=True)
            for i in range(n_per_class):
                arr = (torch.rand(size, size, 3, generator=g) * 100 + 100 * c).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / name / f"{i}.png")
        return root
    return make
