"""Reward models on ranks of their own (grpo.reward_ranks = N): the last N ranks of the world score the videos
that the policy ranks roll out and decode, so a large reward model needs no room beside the policy.

The policy's layout (data, tensor, SSP, Ulysses, FSDP) covers the first world - N ranks, whose default group
holds only them (osp_megatron.parallel.state.WorldSplit). Each model replica's first rank sends its uint8
videos and prompt indices over the gloo bridge to reward rank (its data-parallel rank mod N), which scores
them and sends the scores back; the replica's other ranks receive them by broadcast. Group statistics and
advantages are then computed exactly as with local rewards.
"""

import torch
import torch.distributed as dist

from osp_megatron.parallel import state
from osp_megatron.rl.rewards import build_rewards, score_videos

_STOP, _SCORE = 0, 1
# A request's header: kind, then the videos' shape [B, T, H, W, C].
_HEADER = 6


def replica_leader(data_rank: int, parallel_config) -> int:
    """The policy rank that speaks for replica `data_rank`: tensor and context ranks are innermost
    (order tp-cp-ep-dp-pp), so it is data_rank x tensor x ssp x ulysses."""
    return data_rank * parallel_config.tensor * parallel_config.context


class RewardClient:
    """The policy side: score(videos, prompt_ids) -> [B, rewards] from this replica's reward rank."""

    def __init__(self, config, device: torch.device, num_rewards: int):
        split = state.world_split()
        self.bridge, self.num_rewards, self.device = split.bridge, num_rewards, device
        self.server = split.served_size + state.data_parallel_rank() % split.reserved
        self.replica = state.amax_reduction_group()  # the tensor x context ranks of this model replica
        self.replica_size = dist.get_world_size(self.replica)
        self.is_leader = dist.get_rank(self.replica) == 0
        self.closed = False

    def _send(self, tensor: torch.Tensor) -> None:
        self.bridge.send([tensor.cpu().contiguous()], self.server, 0).wait()

    def score(self, videos: torch.Tensor, prompt_ids: list[int]) -> torch.Tensor:
        """uint8 videos [B, T, H, W, 3] (B may be 0: a round with nothing to score) -> float32 scores [B, R]."""
        scores = torch.zeros(len(prompt_ids), self.num_rewards)
        if self.is_leader:
            self._send(torch.tensor([_SCORE, *videos.shape], dtype=torch.int64))
            if len(prompt_ids):
                self._send(videos)
                self._send(torch.tensor(prompt_ids, dtype=torch.int64))
                self.bridge.recv([scores], self.server, 0).wait()
        if self.replica_size > 1 and len(prompt_ids):
            shared = scores.to(state.communication_device())
            dist.broadcast(shared, group=self.replica, group_src=0)
            scores = shared.cpu()
        return scores

    def empty_round(self) -> None:
        """Keep step with the reward rank when this replica has nothing to score (evaluation prompts run out)."""
        self.score(torch.zeros(0, 1, 1, 1, 3, dtype=torch.uint8), [])

    def close(self) -> None:
        if self.is_leader and not self.closed:
            self._send(torch.tensor([_STOP, 0, 0, 0, 0, 0], dtype=torch.int64))
        self.closed = True


class RewardServer:
    """The reward side: builds the rewards on this rank's device and scores its replicas' requests, round by
    round in a fixed order, until each has said it stopped. Has the trainer's train(stop) interface."""

    logging_rank = False

    def __init__(self, config):
        from osp_megatron.rl.prompts import build_prompt_set

        split = state.world_split()
        local_rank = split.world_rank - split.served_size
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available() and config.train.device != "cpu"
            else torch.device("cpu")
        )
        self.rewards = build_rewards(config.grpo.rewards, self.device, video_fps=config.sample.fps)

        def no_text_encoder():
            raise RuntimeError("reward ranks score prompts as text; they encode none")

        self.prompts = build_prompt_set(config.prompts, config.model, no_text_encoder).prompts
        replicas = split.served_size // (config.parallel.tensor * config.parallel.context)
        self.clients = [replica_leader(k, config.parallel) for k in range(replicas) if k % split.reserved == local_rank]
        self.bridge = split.bridge
        self.requests = 0

    def serve_one(self, client: int) -> bool:
        """Answer one request of `client`; False when it said it stopped."""
        header = torch.empty(_HEADER, dtype=torch.int64)
        self.bridge.recv([header], client, 0).wait()
        kind, *shape = header.tolist()
        if kind == _STOP:
            return False
        if shape[0]:
            videos = torch.empty(shape, dtype=torch.uint8)
            self.bridge.recv([videos], client, 0).wait()
            prompt_ids = torch.empty(shape[0], dtype=torch.int64)
            self.bridge.recv([prompt_ids], client, 0).wait()
            scores = score_videos(self.rewards, videos, [self.prompts[i] for i in prompt_ids.tolist()])
            self.bridge.send([scores.contiguous()], client, 0).wait()
            self.requests += 1
        return True

    def train(self, stop=None) -> dict:
        active = list(self.clients)
        while active:
            active = [client for client in active if self.serve_one(client)]
        return {"step": self.requests, "status": "finished"}
