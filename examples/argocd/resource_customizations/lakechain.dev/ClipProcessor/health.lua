-- Argo CD health check for lakechain.dev/ClipProcessor.
-- Healthy:     Ready is True for the current generation (including scaled to zero).
-- Progressing: no status yet, a generation the operator has not observed, deletion in progress,
--              or Progressing True (cache warming, workers starting from zero, ...).
-- Suspended:   Suspended is True (spec.suspend: no workers, the queue is not read).
-- Degraded:    Degraded is True; the message is the condition's.
-- Written for gopher-lua (Lua 5.1), the interpreter Argo CD embeds.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function message(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

local function current(c)
  return generation == nil or c.observedGeneration == nil or c.observedGeneration == generation
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Deleting: the operator is removing the NodePool and the cache volume"
  return hs
end

if obj.status == nil or obj.status.conditions == nil or #obj.status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

if generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end

-- Suspended on purpose (spec.suspend): Argo CD's own Suspended status, not a failure.
local suspended = condition("Suspended")
if suspended ~= nil and suspended.status == "True" and current(suspended) then
  hs.status = "Suspended"
  hs.message = message(suspended, "The processor is suspended")
  return hs
end

local degraded = condition("Degraded")
if degraded ~= nil and degraded.status == "True" and current(degraded) then
  hs.status = "Degraded"
  hs.message = message(degraded, "The processor is degraded")
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" and current(ready) then
  hs.status = "Healthy"
  hs.message = message(ready, "The processor is ready")
  return hs
end

local progressing = condition("Progressing")
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = message(progressing, "Reconciling")
  return hs
end

hs.status = "Progressing"
hs.message = message(ready, "Waiting for the Ready condition")
return hs
