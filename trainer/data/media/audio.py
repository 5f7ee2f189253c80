"""Audio signal processing for ingest: channel downmix, resampling, time-stretch and quality measures.

Everything takes float32 arrays shaped ``[channels, samples]`` and is vectorised with numpy / scipy
(no Python loop per sample). The measures feed the dataset doctor:

- ``integrated_loudness``: ITU-R BS.1770-4 / EBU R128 programme loudness (K-weighting, 400 ms blocks
  with 75 % overlap, absolute gate -70 LUFS, relative gate -10 LU);
- ``peak_dbfs``, ``clipped_fraction``, ``silence_fraction``;
- ``speech_seconds``: an estimate of usable speech (loud enough frames near periodic, voiced frames).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

# --------------------------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------------------------

MINUS_3DB = 1.0 / math.sqrt(2.0)  # ITU-R BS.775 downmix coefficient for centre and surround channels

# FFmpeg channel names by the side they belong to in a stereo downmix. The LFE channel is left out of a
# downmix (BS.775), centre-line channels go to both sides at -3 dB, side/back pairs to their side at -3 dB.
_FRONT_LEFT = {"FL", "FLC", "TFL", "WL"}
_FRONT_RIGHT = {"FR", "FRC", "TFR", "WR"}
_SURROUND_LEFT = {"SL", "BL", "TBL", "TSL", "SDL"}
_SURROUND_RIGHT = {"SR", "BR", "TBR", "TSR", "SDR"}
_CENTRE = {"FC", "BC", "TC", "TFC", "TBC"}
_LOW_FREQUENCY = {"LFE", "LFE2", "LFE3"}

# The order FFmpeg uses for a 6-channel stream whose layout is unknown ("5.1").
DEFAULT_LAYOUTS: dict[int, tuple[str, ...]] = {
    1: ("FC",),
    2: ("FL", "FR"),
    6: ("FL", "FR", "FC", "LFE", "BL", "BR"),
    8: ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"),
}


def downmix_matrix(channel_names: Sequence[str]) -> np.ndarray | None:
    """``[2, C]`` stereo downmix matrix from channel names, or None when a name has no known side.

    Front channels keep gain 1, centre and surround channels get -3 dB (ITU-R BS.775: Lo = L + 0.707 C
    + 0.707 Ls), LFE is dropped. No normalisation: speech usually lives in the centre channel and
    keeps its level this way; the float pipeline does not clip.
    """
    matrix = np.zeros((2, len(channel_names)), dtype=np.float32)
    for i, name in enumerate(channel_names):
        if name in _FRONT_LEFT:
            matrix[0, i] = 1.0
        elif name in _FRONT_RIGHT:
            matrix[1, i] = 1.0
        elif name in _SURROUND_LEFT:
            matrix[0, i] = MINUS_3DB
        elif name in _SURROUND_RIGHT:
            matrix[1, i] = MINUS_3DB
        elif name in _CENTRE:
            matrix[:, i] = MINUS_3DB
        elif name in _LOW_FREQUENCY:
            continue
        else:
            return None
    return matrix


def to_stereo(samples: np.ndarray, channel_names: Sequence[str] | None = None) -> np.ndarray:
    """``[C, S]`` → ``[2, S]`` float32: mono duplicated, stereo kept, more channels downmixed.

    With channel names (FFmpeg's, e.g. ``FL FR FC LFE BL BR``) the ITU-R BS.775 coefficients are used;
    without names a 6- or 8-channel stream is taken as FFmpeg's default 5.1 / 7.1 order. Any other
    layout (unknown names or channel counts) is averaged to mono and duplicated.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"audio must be shaped [channels, samples] with at least one channel, got {samples.shape}")
    channels = samples.shape[0]
    if channels == 2:
        return samples
    if channels == 1:
        return np.repeat(samples, 2, axis=0)
    names = tuple(channel_names) if channel_names else DEFAULT_LAYOUTS.get(channels)
    matrix = downmix_matrix(names) if names is not None and len(names) == channels else None
    if matrix is None:
        mono = samples.mean(axis=0, keepdims=True)
        return np.repeat(mono, 2, axis=0)
    return (matrix @ samples).astype(np.float32, copy=False)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[C, S]`` → ``[S]``, the channel average (for analysis only)."""
    samples = np.asarray(samples, dtype=np.float32)
    return samples.mean(axis=0) if samples.ndim == 2 else samples


# --------------------------------------------------------------------------------------------
# Resampling and time-stretch
# --------------------------------------------------------------------------------------------


def require_soxr():
    """The ``soxr`` module, imported when audio is first resampled (a missing package must not stop the ComfyUI
    pack from loading), or an ImportError that says how to install it."""
    try:
        import soxr
    except ImportError as exc:
        raise ImportError(f"resampling audio needs the soxr package ({exc}); install it with `pip install soxr` "
                          "(it is in the pack's requirements.txt)") from None
    return soxr


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling of ``[C, S]`` with soxr at its very-high-quality setting."""
    samples = np.asarray(samples, dtype=np.float32)
    if int(from_rate) == int(to_rate):
        return samples
    if samples.shape[-1] == 0:
        return np.zeros((samples.shape[0], 0), dtype=np.float32)
    # soxr wants [frames, channels], C-contiguous.
    out = require_soxr().resample(np.ascontiguousarray(samples.T), int(from_rate), int(to_rate), quality="VHQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def time_stretch(samples: np.ndarray, length_factor: float, sample_rate: int) -> np.ndarray:
    """Make ``[C, S]`` audio ``length_factor`` times longer (or shorter) without changing its pitch.

    WSOLA (waveform-similarity overlap-add, Verhelst & Roelands 1993): the output is built from
    Hann-windowed 40 ms segments of the input, placed every 20 ms. Each segment is read from the input
    near its nominal position (output time / factor), shifted by up to ±10 ms to the place whose
    waveform best continues the previous segment, so periods line up and no phasing is heard. The
    shift is found on the channel average and applied to every channel, which keeps the stereo image.
    The result has exactly ``round(S * length_factor)`` samples.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 2:
        raise ValueError(f"audio must be shaped [channels, samples], got {samples.shape}")
    if not (0.25 <= length_factor <= 4.0):
        raise ValueError(f"time-stretch factor {length_factor} is outside [0.25, 4]; retime such a clip differently")
    channels, length = samples.shape
    out_length = int(round(length * length_factor))
    if abs(length_factor - 1.0) < 1e-9 or length == 0:
        return _fit_length(samples, out_length)

    window_size = 2 * max(16, int(round(0.02 * sample_rate)))  # 40 ms, even
    hop = window_size // 2
    tolerance = hop // 2
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window_size) / window_size)).astype(np.float32)

    # Pad so every read (nominal position ± tolerance, one window long) stays inside the array.
    pad = int(math.ceil(window_size / length_factor)) + window_size + tolerance
    padded = np.pad(samples, ((0, 0), (pad, pad + window_size)))
    guide = padded.mean(axis=0)

    # Output frame k covers output samples [k·hop - window, k·hop): starting one window early makes the
    # overlap-add weights sum to a constant from sample 0 on.
    frame_count = int(math.ceil((out_length + window_size) / hop)) + 1
    out = np.zeros((channels, frame_count * hop + window_size), dtype=np.float32)
    weight = np.zeros(frame_count * hop + window_size, dtype=np.float32)
    previous = None
    for k in range(frame_count):
        # Centre of this output window (output time k·hop - window/2) maps to input time /factor.
        nominal = pad + int(round((k * hop - window_size / 2) / length_factor - window_size / 2))
        if previous is None:
            position = nominal
        else:
            # The segment that would naturally follow the previous one in the input.
            template = guide[previous + hop : previous + hop + window_size]
            region = guide[nominal - tolerance : nominal + tolerance + window_size]
            similarity = np.correlate(region, template, mode="valid")
            best = int(np.argmax(similarity))
            # In silence every shift is equally good: stay on the nominal position rather than drift.
            position = nominal - tolerance + best if similarity[best] > 1e-9 else nominal
        out[:, k * hop : k * hop + window_size] += padded[:, position : position + window_size] * window
        weight[k * hop : k * hop + window_size] += window
        previous = position
    start = window_size  # output sample 0 sits one window into the buffer
    result = out[:, start : start + out_length] / np.maximum(weight[start : start + out_length], 1e-6)
    return _fit_length(result.astype(np.float32, copy=False), out_length)


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    if samples.shape[1] >= length:
        return np.ascontiguousarray(samples[:, :length])
    return np.pad(samples, ((0, 0), (0, length - samples.shape[1])))


# --------------------------------------------------------------------------------------------
# Loudness (ITU-R BS.1770-4, EBU R128)
# --------------------------------------------------------------------------------------------

# Parameters of the two K-weighting stages (the BS.1770 pre-filter: a ~+4 dB high shelf modelling the
# head; the RLB filter: a 38 Hz high-pass). At 48 kHz they give exactly the coefficients tabulated
# in the standard; the bilinear transform below re-derives them for any sample rate.
_SHELF_HZ = 1681.974450955533
_SHELF_GAIN_DB = 3.999843853973347
_SHELF_Q = 0.7071752369554196
_HIGHPASS_HZ = 38.13547087602444
_HIGHPASS_Q = 0.5003270373238773

ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
BLOCK_SECONDS = 0.4
BLOCK_STEP_SECONDS = 0.1  # 75 % overlap

# Channel weights G_i of BS.1770: 1.0 for front/centre, 1.41 (+1.5 dB) for surrounds, LFE excluded.
_SURROUND_WEIGHT = 1.41


def k_weighting_filters(sample_rate: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((b, a) pre-filter, (b, a) RLB high-pass)`` biquads of the K-weighting at ``sample_rate``."""
    k = math.tan(math.pi * _SHELF_HZ / sample_rate)
    gain_high = 10.0 ** (_SHELF_GAIN_DB / 20.0)
    gain_band = gain_high**0.4996667741545416
    a0 = 1.0 + k / _SHELF_Q + k * k
    shelf_b = np.array([
        (gain_high + gain_band * k / _SHELF_Q + k * k) / a0,
        2.0 * (k * k - gain_high) / a0,
        (gain_high - gain_band * k / _SHELF_Q + k * k) / a0,
    ])
    shelf_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _SHELF_Q + k * k) / a0])

    k = math.tan(math.pi * _HIGHPASS_HZ / sample_rate)
    a0 = 1.0 + k / _HIGHPASS_Q + k * k
    highpass_b = np.array([1.0, -2.0, 1.0])
    highpass_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _HIGHPASS_Q + k * k) / a0])
    return (shelf_b, shelf_a), (highpass_b, highpass_a)


def loudness_channel_weights(channel_names: Sequence[str] | None, channels: int) -> np.ndarray:
    """BS.1770 weight per channel (surround 1.41, LFE 0, everything else 1)."""
    names = tuple(channel_names) if channel_names else DEFAULT_LAYOUTS.get(channels, ("",) * channels)
    if len(names) != channels:
        names = ("",) * channels
    weights = np.ones(channels, dtype=np.float64)
    for i, name in enumerate(names):
        if name in _LOW_FREQUENCY:
            weights[i] = 0.0
        elif name in _SURROUND_LEFT or name in _SURROUND_RIGHT:
            weights[i] = _SURROUND_WEIGHT
    return weights


def integrated_loudness(
    samples: np.ndarray, sample_rate: int, channel_names: Sequence[str] | None = None
) -> float | None:
    """Gated programme loudness in LUFS of ``[C, S]`` audio; None when there is nothing above the
    absolute gate (silence) or the audio is shorter than one 400 ms block.

    Each channel is measured as a separate loudspeaker feed, as the standard defines it: a full-scale
    997 Hz sine in one channel reads -3.01 LUFS, the same sine in both channels of a stereo file 0 LUFS.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 1:
        samples = samples[None]
    channels, length = samples.shape
    block = int(round(BLOCK_SECONDS * sample_rate))
    step = int(round(BLOCK_STEP_SECONDS * sample_rate))
    if length < block:
        return None
    (shelf_b, shelf_a), (hp_b, hp_a) = k_weighting_filters(sample_rate)
    weighted = signal.lfilter(hp_b, hp_a, signal.lfilter(shelf_b, shelf_a, samples, axis=1), axis=1)

    # Mean square of every 400 ms block from a running sum: z[c, j].
    cumulative = np.concatenate([np.zeros((channels, 1)), np.cumsum(weighted * weighted, axis=1)], axis=1)
    starts = np.arange(0, length - block + 1, step)
    block_power = (cumulative[:, starts + block] - cumulative[:, starts]) / block
    weights = loudness_channel_weights(channel_names, channels)
    summed = weights @ block_power  # Σ_i G_i z_ij
    with np.errstate(divide="ignore"):
        block_loudness = -0.691 + 10.0 * np.log10(summed)

    above_absolute = block_loudness > ABSOLUTE_GATE_LUFS
    if not above_absolute.any():
        return None
    relative_gate = -0.691 + 10.0 * math.log10(summed[above_absolute].mean()) + RELATIVE_GATE_LU
    gated = above_absolute & (block_loudness > relative_gate)
    return float(-0.691 + 10.0 * math.log10(summed[gated].mean()))


# --------------------------------------------------------------------------------------------
# Level, clipping, silence, speech
# --------------------------------------------------------------------------------------------

CLIP_LEVEL = 0.999  # |x| at or above this (-0.009 dBFS) counts as clipped
SILENCE_DBFS = -60.0  # analysis frames quieter than this are silence
SPEECH_MIN_DBFS = -50.0  # analysis frames quieter than this are never speech
VOICING_THRESHOLD = 0.45  # normalised autocorrelation at the pitch lag
PITCH_RANGE_HZ = (60.0, 400.0)
SPEECH_SPREAD_SECONDS = 0.15  # unvoiced consonants around voiced frames still count as speech


def peak_dbfs(samples: np.ndarray) -> float:
    """Sample peak in dBFS (-inf for digital silence or empty audio)."""
    samples = np.asarray(samples)
    if samples.size == 0:
        return float("-inf")
    peak = float(np.max(np.abs(samples)))
    return 20.0 * math.log10(peak) if peak > 0 else float("-inf")


def clipped_fraction(samples: np.ndarray, level: float = CLIP_LEVEL) -> float:
    """Fraction of samples (all channels) at or beyond ``level`` of full scale."""
    samples = np.asarray(samples)
    if samples.size == 0:
        return 0.0
    return float(np.count_nonzero(np.abs(samples) >= level) / samples.size)


@dataclass
class FrameAnalysis:
    """Per-frame level and voicing of the channel average (one frame every 10 ms)."""

    hop_seconds: float
    level_dbfs: np.ndarray  # [frames]
    voicing: np.ndarray  # [frames], normalised autocorrelation peak in the pitch range (0..1)


ANALYSIS_RATE = 16000  # level / voicing analysis runs on a 16 kHz mono copy (speech band, bounded cost)
_ANALYSIS_CHUNK_FRAMES = 2048  # frames per vectorised block, bounds memory on long recordings


def analyse_frames(samples: np.ndarray, sample_rate: int) -> FrameAnalysis:
    """Frame levels (RMS dBFS, 25 ms windows) and voicing strength (40 ms windows) every 10 ms, on the
    channel average resampled to 16 kHz."""
    mono = to_mono(samples)[None]
    if sample_rate != ANALYSIS_RATE:
        mono = resample(mono, sample_rate, ANALYSIS_RATE)
    mono = mono[0].astype(np.float64)
    rate = ANALYSIS_RATE
    hop = int(round(0.010 * rate))
    level_size = int(round(0.025 * rate))
    voicing_size = int(round(0.040 * rate))
    if mono.size < voicing_size:
        return FrameAnalysis(hop / rate, np.zeros(0), np.zeros(0))
    frame_count = 1 + (mono.size - voicing_size) // hop
    all_frames = np.lib.stride_tricks.sliding_window_view(mono, voicing_size)[::hop][:frame_count]

    # Voicing: Hann-windowed autocorrelation divided by the window's own autocorrelation (Boersma 1993),
    # whose peak in the pitch-lag range is ~1 for periodic frames and small for noise.
    window = np.hanning(voicing_size)
    fft_size = 1 << int(math.ceil(math.log2(2 * voicing_size)))
    window_autocorr = np.fft.irfft(np.abs(np.fft.rfft(window, n=fft_size)) ** 2, n=fft_size)[:voicing_size]
    min_lag = int(rate / PITCH_RANGE_HZ[1])
    max_lag = min(int(rate / PITCH_RANGE_HZ[0]), voicing_size // 2)
    offset = (voicing_size - level_size) // 2  # level on the central 25 ms of each 40 ms frame

    level = np.empty(frame_count)
    voicing = np.empty(frame_count)
    for start in range(0, frame_count, _ANALYSIS_CHUNK_FRAMES):
        frames = all_frames[start : start + _ANALYSIS_CHUNK_FRAMES]
        stop = start + frames.shape[0]
        power = np.mean(frames[:, offset : offset + level_size] ** 2, axis=1)
        level[start:stop] = 10.0 * np.log10(np.maximum(power, 1e-20))
        centred = frames - frames.mean(axis=1, keepdims=True)
        spectrum = np.fft.rfft(centred * window, n=fft_size, axis=1)
        autocorr = np.fft.irfft(np.abs(spectrum) ** 2, n=fft_size, axis=1)[:, : max_lag + 1]
        normalised = autocorr[:, min_lag:] / window_autocorr[min_lag : max_lag + 1]
        energy = np.maximum(autocorr[:, 0] / window_autocorr[0], 1e-20)
        voicing[start:stop] = np.clip(normalised.max(axis=1) / energy, 0.0, 1.0)
    return FrameAnalysis(hop / rate, level, voicing)


def silence_fraction(samples: np.ndarray, sample_rate: int, threshold_dbfs: float = SILENCE_DBFS) -> float:
    """Fraction of 10 ms analysis frames whose level is below ``threshold_dbfs`` (1.0 for empty audio)."""
    analysis = analyse_frames(samples, sample_rate)
    if analysis.level_dbfs.size == 0:
        return 1.0
    return float(np.mean(analysis.level_dbfs < threshold_dbfs))


def speech_seconds(samples: np.ndarray, sample_rate: int) -> float:
    """Estimated seconds of usable speech: frames loud enough (above -50 dBFS and 12 dB over the
    clip's noise floor) that are voiced (periodic in the 60-400 Hz pitch range) or within 150 ms of a
    voiced frame. A rough measure for "how much voice does this dataset have", not a VAD model."""
    analysis = analyse_frames(samples, sample_rate)
    if analysis.level_dbfs.size == 0:
        return 0.0
    noise_floor = float(np.percentile(analysis.level_dbfs, 10))
    loud = analysis.level_dbfs > max(SPEECH_MIN_DBFS, noise_floor + 12.0)
    # A clip that is speech from end to end has no quiet frames to estimate the floor from.
    if np.mean(analysis.level_dbfs > SPEECH_MIN_DBFS) > 0.9:
        loud = analysis.level_dbfs > SPEECH_MIN_DBFS
    voiced = loud & (analysis.voicing >= VOICING_THRESHOLD)
    spread = int(round(SPEECH_SPREAD_SECONDS / analysis.hop_seconds))
    near_voiced = ndimage.binary_dilation(voiced, iterations=spread) if voiced.any() and spread > 0 else voiced
    return float(np.count_nonzero(loud & near_voiced) * analysis.hop_seconds)


@dataclass
class AudioStats:
    """The audio measures the doctor reports (None where a measure does not exist, e.g. silence)."""

    loudness_lufs: float | None
    peak_dbfs: float | None
    clipped_fraction: float
    silence_fraction: float
    speech_seconds: float


def measure(samples: np.ndarray, sample_rate: int, channel_names: Sequence[str] | None = None) -> AudioStats:
    """All measures of ``[C, S]`` audio at its own rate and channels (loudness per BS.1770 channel
    weights; silence and speech on the channel average)."""
    peak = peak_dbfs(samples)
    return AudioStats(
        loudness_lufs=integrated_loudness(samples, sample_rate, channel_names),
        peak_dbfs=peak if math.isfinite(peak) else None,
        clipped_fraction=clipped_fraction(samples),
        silence_fraction=silence_fraction(samples, sample_rate),
        speech_seconds=speech_seconds(samples, sample_rate),
    )
