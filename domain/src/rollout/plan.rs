//! The checks of a rollout's targets and wave plan.

use super::*;

/// Checks the targets and the wave plan; returns the plan as the event records it: the
/// percentages, or the sizes with a last wave for the targets the sizes leave over.
pub(super) fn validate_plan(
    targets: &[DeviceId],
    waves: Waves,
) -> Result<(Vec<u8>, Vec<usize>), RolloutError> {
    if targets.is_empty() {
        return Err(RolloutError::NoTargets);
    }
    if targets.len() > MAX_TARGETS {
        return Err(RolloutError::TooManyTargets);
    }
    let mut seen = HashSet::with_capacity(targets.len());
    if let Some(duplicate) = targets.iter().find(|d| !seen.insert(*d)) {
        return Err(RolloutError::DuplicateTarget(duplicate.clone()));
    }
    match waves {
        Waves::Percentages(waves) => {
            let rising = waves.windows(2).all(|w| w[0] < w[1]);
            if waves.is_empty() || !rising || waves[0] == 0 || waves.last() != Some(&100) {
                return Err(RolloutError::InvalidWaves);
            }
            // A wave that would hold no device (a tenth of one device is none) is left out,
            // so the default plan serves a fleet of one: of several boundaries that fall on
            // the same device, the last one stays.
            let end_of = |p: u8| (targets.len() * usize::from(p)).div_ceil(100);
            let kept: Vec<u8> = waves
                .iter()
                .enumerate()
                .filter(|(i, p)| {
                    waves
                        .get(i + 1)
                        .is_none_or(|next| end_of(*next) > end_of(**p))
                })
                .map(|(_, p)| *p)
                .collect();
            Ok((kept, Vec::new()))
        }
        Waves::Sizes(sizes) => {
            if sizes.is_empty() || sizes.len() > MAX_WAVES || sizes.contains(&0) {
                return Err(RolloutError::InvalidWaveSizes(targets.len()));
            }
            // Sizes past the targets are clamped: the waves fill up in order and those left
            // with no device are dropped; the targets the sizes leave over form a last wave.
            let mut left = targets.len();
            let mut clamped = Vec::with_capacity(sizes.len() + 1);
            for size in sizes {
                let size = size.min(left);
                if size == 0 {
                    break;
                }
                clamped.push(size);
                left -= size;
            }
            if left > 0 {
                if clamped.len() == MAX_WAVES {
                    return Err(RolloutError::InvalidWaveSizes(targets.len()));
                }
                clamped.push(left);
            }
            Ok((Vec::new(), clamped))
        }
    }
}

pub(super) fn validate_reason(reason: &str) -> Result<(), RolloutError> {
    if crate::is_valid_reason(reason) {
        Ok(())
    } else {
        Err(RolloutError::InvalidReason)
    }
}
