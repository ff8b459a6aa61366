"""Model zoo (issue 11, item 7): torch.nn's own sequence layers with the defaults, float64."""

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import curvop  # noqa: E402
from _zoo import check_torch  # noqa: E402

pytestmark = pytest.mark.zoo


class Classifier(nn.Module):
    """A sequence layer, mean over time, a linear head."""

    def __init__(self, body, width):
        super().__init__()
        self.body, self.head = body, nn.Linear(width, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head((h[0] if isinstance(h, tuple) else h).mean(dim=1))


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("body", [
    # attention, LayerNorm, dropout (off in eval): needs helper "attn"'s attention support
    pytest.param(lambda: nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, batch_first=True),
                 id="TransformerEncoderLayer"),
    pytest.param(lambda: nn.LSTM(8, 6, num_layers=2, batch_first=True), id="LSTM"),
    pytest.param(lambda: nn.GRU(8, 6, batch_first=True, bidirectional=True), id="GRU"),
])
def test_issue11_item7_torch_nn_sequence_layers(sequences, body):
    torch.manual_seed(0)
    layer = body()
    width = 8 if isinstance(layer, nn.TransformerEncoderLayer) else 6 * (2 if layer.bidirectional else 1)
    model = Classifier(layer, width).double().eval()
    ce, (x, y) = nn.CrossEntropyLoss(), sequences
    H = curvop.hessian(model, ce, (x, y))
    check_torch(H, model, lambda: ce(model(x), y))
