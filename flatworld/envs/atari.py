"""Atari 2600 games (`atari/<Game>`) by the Atari-100k protocol of DreamerV3 v1 and TWISTER.

Ids use ALE's game names in CamelCase (`atari/Pong`, `atari/MsPacman`, `atari/UpNDown`); case,
underscores and hyphens are ignored when resolving (`atari/ms_pacman`). The ROMs ship in the
ale-py wheel (`pip install 'flatworld[atari]'`). The protocol, by default:

- 64x64 RGB observations, uint8, channels first (3, 64, 64);
- the game's minimal action set, as a Discrete space;
- action repeat 4, the observation being the max over the last two raw frames;
- sticky actions off (`repeat_action_probability=0`);
- 0 to `noop_max`=30 no-ops after each reset, their number drawn from the env's seeded RNG;
- a life loss is not a terminal (`info["lives"]` reports lives); game over is `terminated`;
- episodes truncate at 108,000 emulator frames (27,000 agent steps);
- rewards are the game's score changes, summed over the repeat and never clipped.

`human_normalized(game, score)` gives (score - random) / (human - random), and
`random_score(game)` the random policy's score, from the packaged table `data/atari100k.csv`
(sources in `data/README.md`).
"""

from __future__ import annotations

import csv
import difflib
import functools
import importlib.resources
from typing import Any

import gymnasium as gym
import numpy as np

# The Atari-100k benchmark's 26 games (Kaiser et al., 2020), in ALE's CamelCase names.
ATARI100K = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)  # fmt: skip

ALE_PIP = "pip install 'flatworld[atari]'"


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _camel(rom_id: str) -> str:
    """ALE's ROM id (`up_n_down`) to its game name (`UpNDown`), as gymnasium's ALE ids spell it."""
    return rom_id.title().replace("_", "")


@functools.cache
def _rom_ids() -> tuple[str, ...]:
    """The wheel's ROMs that ALE runs single-player. A few (Combat, Joust, MazeCraze,
    Warlords) are multi-player only: ALE exits the process when one is loaded, so they are
    left out (isSupportedROM checks a ROM's MD5 without loading it; about 5 ms for all)."""
    from ale_py import ALEInterface, LoggerMode, roms

    ALEInterface.setLoggerMode(LoggerMode.Error)
    ale = ALEInterface()
    return tuple(r for r in roms.get_all_rom_ids() if ale.isSupportedROM(roms.get_rom_path(r)))


def game_ids() -> list[str]:
    """Every single-player game whose ROM ships with the installed ale-py (the 26 of ATARI100K
    among them); without ale-py, just the 26."""
    try:
        rom_ids = _rom_ids()
    except ImportError:
        return list(ATARI100K)
    return sorted(_camel(r) for r in rom_ids)


def resolve(name: str) -> str | None:
    """A game name (case, `_` and `-` ignored) to its CamelCase name, or None when unknown."""
    table = {_key(g): g for g in game_ids()}
    return table.get(_key(name))


def _rom_path(game: str) -> str:
    from ale_py import roms

    table = {_key(_camel(r)): r for r in _rom_ids()}
    return str(roms.get_rom_path(table[_key(game)]))


def resize_area(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by area averaging.

    Pillow's BOX filter: each output pixel is the mean of the source pixels its footprint
    covers, weighted by the covered area, which is what cv2.INTER_AREA (DreamerV3's resize)
    computes when shrinking. Pillow is already installed with matplotlib; cv2 is not needed.
    """
    from PIL import Image

    image = Image.fromarray(frame).resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


class AtariEnv(gym.Env):
    """One ALE game, by the Atari-100k protocol (see the module docstring).

    Built directly on ale_py's ALEInterface rather than on gymnasium's ALE env with
    frameskip=1: the protocol then lives in one place (no wrapper stack whose defaults might
    add sticky actions, no-ops or a frame limit of their own), every emulator frame is
    counted here, and the two raw frames that are max-pooled are always consecutive ones.

    `max_frames` counts emulator frames since the game's reset, the no-op frames included,
    as ALE's own `max_num_frames_per_episode` does; a repeat that reaches the cap stops there.
    `episode_length` (agent steps) is ceil(max_frames / action_repeat), the most an episode
    can last. Observations are the max over the last two consecutive raw frames (with
    action_repeat=1 these span two agent steps; right after a reset without no-ops the only
    frame there is). `info` has `lives` and `frame` (the episode's emulator frame number).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        game: str,
        seed: int = 0,
        action_repeat: int = 4,
        noop_max: int = 30,
        max_frames: int = 108_000,
        image_size: int = 64,
        sticky: float = 0.0,
    ) -> None:
        for name, value, low in (("action_repeat", action_repeat, 1), ("noop_max", noop_max, 0),
                                 ("max_frames", max_frames, 1), ("image_size", image_size, 8)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
        bad_sticky = isinstance(sticky, bool) or not isinstance(sticky, int | float)
        if bad_sticky or not 0.0 <= float(sticky) <= 1.0:
            raise ValueError(f"sticky={sticky!r}: expected a float in [0, 1] "
                             "(the repeat_action_probability; the protocol uses 0)")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected an int >= 0")
        game_name = resolve(game)
        if game_name is None:
            close = difflib.get_close_matches(game, game_ids(), n=5, cutoff=0.5)
            raise ValueError(f"unknown Atari game {game!r}; close matches: {close or 'none'}")
        try:
            from ale_py import ALEInterface, LoggerMode
        except ImportError as err:
            from flatworld.envs.gym_suite import MissingDependencyError

            raise MissingDependencyError(f"atari/ games need ale-py: {ALE_PIP}") from err

        ALEInterface.setLoggerMode(LoggerMode.Error)  # no banner on every construction
        self.game = game_name
        self.action_repeat, self.noop_max, self.max_frames = action_repeat, noop_max, max_frames
        self.image_size, self.sticky = image_size, float(sticky)
        self.episode_length = -(-max_frames // action_repeat)
        self._rom = _rom_path(game_name)
        self._ale = ALEInterface()
        self._loaded_seed: int | None = None
        self._fresh = False  # the ROM was just loaded: nothing has run since
        self._load(self._seed_streams(seed))
        self._actions = list(self._ale.getMinimalActionSet())
        self.action_space = gym.spaces.Discrete(len(self._actions))
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        height, width = self._ale.getScreenDims()
        # The last two raw frames, in emulation order: _screens[_last] is the newest.
        self._screens = np.zeros((2, height, width, 3), np.uint8)
        self._last = 0
        self.noops = 0  # no-ops applied at the last reset

    @property
    def ale(self) -> Any:
        """The underlying ale_py.ALEInterface, for diagnostics (frame numbers, lives, RAM)."""
        return self._ale

    def _seed_streams(self, seed: int) -> int:
        """Reseed the no-op RNG from `seed` and return the ALE's seed (an independent stream)."""
        noop_state, ale_state = np.random.SeedSequence(seed).generate_state(2)
        self._np_random = np.random.default_rng(int(noop_state))
        self._np_random_seed = seed
        return int(ale_state) & 0x7FFFFFFF  # ALE takes a non-negative int32

    def _load(self, ale_seed: int) -> None:
        # ALE reads its settings when a ROM is loaded: reseeding means loading it again.
        if self._fresh and self._loaded_seed == ale_seed:
            return
        self._ale.setInt("random_seed", ale_seed)
        self._ale.setFloat("repeat_action_probability", self.sticky)
        self._ale.setInt("frame_skip", 1)  # every raw frame passes through here
        self._ale.loadROM(self._rom)
        self._loaded_seed, self._fresh = ale_seed, True

    def _act(self, action: int) -> int:
        reward = self._ale.act(action)
        self._last ^= 1
        self._ale.getScreenRGB(self._screens[self._last])
        return reward

    def _obs(self) -> np.ndarray:
        pooled = np.maximum(self._screens[0], self._screens[1])
        return np.ascontiguousarray(resize_area(pooled, self.image_size).transpose(2, 0, 1))

    def _info(self) -> dict[str, Any]:
        return {"lives": int(self._ale.lives()), "frame": int(self._ale.getEpisodeFrameNumber())}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"seed={seed!r}: expected an int >= 0")
            self._load(self._seed_streams(int(seed)))
        from ale_py import Action

        while True:
            self._ale.reset_game()
            self._fresh = False
            self._ale.getScreenRGB(self._screens[self._last])
            self._screens[self._last ^ 1] = self._screens[self._last]
            self.noops = int(self._np_random.integers(0, self.noop_max + 1))
            for _ in range(self.noops):
                self._act(Action.NOOP)
                if self._ale.game_over():
                    break
            if not self._ale.game_over():  # no game ends within 30 frames; stay safe anyway
                return self._obs(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        index = int(action)
        if not 0 <= index < len(self._actions) or index != action:
            raise ValueError(f"action={action!r}: expected an int in [0, {len(self._actions)})")
        ale_action = self._actions[index]
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            reward += self._act(ale_action)
            terminated = bool(self._ale.game_over())
            truncated = self._ale.getEpisodeFrameNumber() >= self.max_frames
            if terminated or truncated:
                break
        return self._obs(), float(reward), terminated, truncated and not terminated, self._info()

    def render(self) -> np.ndarray:
        """The newest raw frame, (210, 160, 3) uint8."""
        return self._screens[self._last].copy()

    def close(self) -> None:
        self._ale = None  # type: ignore[assignment]  # the emulator is freed with its object


def make(game: str, seed: int = 0, **options: Any) -> AtariEnv:
    accepted = ("action_repeat", "noop_max", "max_frames", "image_size", "sticky")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for atari/; accepted: {list(accepted)}")
    env = AtariEnv(game, seed=seed, **options)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


@functools.cache
def _table() -> dict[str, dict[str, float]]:
    text = importlib.resources.files("flatworld.envs").joinpath("data/atari100k.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {r["game"]: {k: float(v) for k, v in r.items() if k != "game"} for r in rows}


def score_table() -> dict[str, dict[str, float]]:
    """Per game: `random` and `human` scores and DreamerV3 v1's published Atari-100k score
    (`dreamerv3_v1`), from the packaged `data/atari100k.csv`. A fresh copy on every call."""
    return {game: dict(row) for game, row in _table().items()}


def _scores_of(game: str) -> dict[str, float]:
    """The table's row of a game (`Pong` or `atari/Pong`; case, `_` and `-` ignored)."""
    name = game.removeprefix("atari/")
    table = _table()
    match = {_key(g): g for g in table}.get(_key(name))
    if match is None:
        close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.5)
        raise ValueError(f"no random/human scores for {game!r}; close matches: "
                         f"{close or 'none'}; the table has {sorted(table)}")  # fmt: skip
    return table[match]


def human_normalized(game: str, score: float) -> float:
    """(score - random) / (human - random) for a game of the table (`Pong` or `atari/Pong`)."""
    row = _scores_of(game)
    return (float(score) - row["random"]) / (row["human"] - row["random"])


def random_score(game: str) -> float:
    """A uniformly random policy's score in the table (the zero of ``human_normalized``)."""
    return _scores_of(game)["random"]
