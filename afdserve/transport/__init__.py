"""M2N transport between attention and expert groups (the only package that calls
torch.distributed): ``topology`` (who is who), ``groups`` (process groups), ``base`` (the
interface), ``reference`` (pure-torch oracle and route/unroute), ``torch_p2p`` (P2P ops)."""
