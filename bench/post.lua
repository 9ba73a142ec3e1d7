-- wrk script: POST one JSON body, optionally made unique per request; print the results as JSON.
--
-- Environment (set by bench/wrk.py):
--   BENCH_PATH       request path, e.g. /v1/predict
--   BENCH_BODY_FILE  file holding the JSON body
--   BENCH_UNIQUE     if set, the text __UNIQUE__ in the body is replaced, per request, by
--                    "<BENCH_UNIQUE>-<thread>-<n>", so that every request is a cache miss
--   BENCH_CYCLE      with BENCH_UNIQUE: cycle through N keys, "<BENCH_UNIQUE>-<n mod N>", so that
--                    requests in flight together ask for different keys that are all cached
--
-- done() prints one line starting with BENCH_JSON. wrk counts every response with status >= 400
-- in errors.status (and socket errors in connect/read/write/timeout); the report shows them all.

local body_file = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local handle = assert(io.open(body_file, "rb"))
local body = handle:read("*a")
handle:close()

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

local unique = os.getenv("BENCH_UNIQUE")
local cycle = tonumber(os.getenv("BENCH_CYCLE") or "")
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

if unique ~= nil and unique ~= "" then
  local head, tail = body:match("^(.-)__UNIQUE__(.*)$")
  assert(head ~= nil, "BENCH_UNIQUE is set but the body has no __UNIQUE__ marker")
  local counter = 0
  request = function()
    counter = counter + 1
    local key
    if cycle ~= nil then
      key = unique .. "-" .. tostring(counter % cycle)
    else
      key = unique .. "-" .. tostring(thread_id) .. "-" .. tostring(counter)
    end
    return wrk.format(nil, nil, nil, head .. key .. tail)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d,"stdev":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, latency.stdev
  ))
end
