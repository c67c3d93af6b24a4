-- Desired and reported documents merge at any depth, as JSON Merge Patch (RFC 7386) and AWS
-- IoT Device Shadow do: an object merges into an object key by key, `null` removes a key at any
-- depth, anything else (arrays included) replaces. The domain's `merge_properties` is the same
-- rule. Rows written before keep what the one-level merge made of them until a replay.
CREATE OR REPLACE FUNCTION fleetlog_merge(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    result jsonb;
    k text;
    v jsonb;
BEGIN
    IF patch IS NULL THEN
        RETURN COALESCE(target, '{}'::jsonb);
    END IF;
    IF jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    result := CASE WHEN jsonb_typeof(target) = 'object' THEN target ELSE '{}'::jsonb END;
    FOR k, v IN SELECT key, value FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(v) = 'null' THEN
            result := result - k;
        ELSE
            result := result || jsonb_build_object(k, fleetlog_merge(result -> k, v));
        END IF;
    END LOOP;
    RETURN result;
END
$$;

-- Patches applied in order: the reported changes a batch folds that one patch cannot say.
CREATE FUNCTION fleetlog_merge_each(target jsonb, patches jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    result jsonb := COALESCE(target, '{}'::jsonb);
    patch jsonb;
BEGIN
    FOR patch IN SELECT value FROM jsonb_array_elements(patches) LOOP
        result := fleetlog_merge(result, patch);
    END LOOP;
    RETURN result;
END
$$;

-- The desired leaves the reported document does not match, at any depth: an object holds only
-- its differing leaves and is left out when none differ. jsonb compares numbers by value, so
-- 1 matches 1.0. The domain's `document_delta` is the same rule.
CREATE OR REPLACE FUNCTION fleetlog_delta(desired jsonb, reported jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    result jsonb := '{}'::jsonb;
    k text;
    wanted jsonb;
    held jsonb;
    inner_delta jsonb;
BEGIN
    FOR k, wanted IN SELECT key, value FROM jsonb_each(COALESCE(desired, '{}'::jsonb)) LOOP
        held := CASE WHEN jsonb_typeof(reported) = 'object' THEN reported -> k END;
        IF jsonb_typeof(wanted) = 'object' THEN
            inner_delta := fleetlog_delta(wanted, held);
            IF inner_delta <> '{}'::jsonb THEN
                result := result || jsonb_build_object(k, inner_delta);
            END IF;
        ELSIF held IS NULL OR held <> wanted THEN
            result := result || jsonb_build_object(k, wanted);
        END IF;
    END LOOP;
    RETURN result;
END
$$;
