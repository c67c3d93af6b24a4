-- An abort now cancels every device of the rollout without an outcome, those sent the update
-- included (they are told to give it up). Rollouts aborted before show those devices as
-- canceled too, as a replay of their events now does, and count what is canceled.
UPDATE rollout_devices rd SET status = 'canceled'
  FROM rollouts r
 WHERE r.rollout_id = rd.rollout_id AND r.status = 'aborted' AND rd.status = 'sent';
UPDATE rollouts r
   SET canceled = (SELECT count(*) FROM rollout_devices rd
                    WHERE rd.rollout_id = r.rollout_id AND rd.status = 'canceled')
 WHERE r.status = 'aborted';

-- Rollout snapshots predate the state an abort and a resume now keep (when it was aborted,
-- what the resume accepted): rollouts are rebuilt from their events.
DELETE FROM snapshots WHERE aggregate_type = 'rollout';

-- Devices with an update under way, by rollout: the rollout manager looks for those of
-- aborted rollouts that were not told yet.
CREATE INDEX ON devices ((firmware_update ->> 'rollout_id')) WHERE firmware_update IS NOT NULL;
