-- Rollouts planned by wave sizes (devices per wave) as well as by cumulative percentages.
-- `waves` keeps the percentages a plan gave (empty for a plan by sizes); `wave_sizes` holds
-- every rollout's devices per wave, whichever way it was planned.
ALTER TABLE rollouts ADD COLUMN wave_sizes integer[] NOT NULL DEFAULT '{}';
UPDATE rollouts r
   SET wave_sizes = COALESCE((SELECT array_agg(n ORDER BY wave)
                                FROM (SELECT wave, count(*)::integer AS n
                                        FROM rollout_devices
                                       WHERE rollout_id = r.rollout_id
                                       GROUP BY wave) per_wave), '{}');
