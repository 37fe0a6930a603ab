/**
 * What the Node stand-ins share for injected faults: a seeded generator, so a fault that fails
 * a share of requests fails the same requests (by position) on every run with the same seed.
 */

/** A small seeded generator of numbers in [0, 1) (mulberry32, 32-bit state). */
export function seededRandom(seed = 1) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const MAX_OUTAGE_SECONDS = 3600;

/**
 * Injected faults of one stand-in, in the shape the issuer and the Service Bus stand-in take:
 * - fault { status, count?, probability?, seed?, retryAfter? }: without probability, the next
 *   `count` (default 1) requests fail; with it, each fails with that probability (seeded draws),
 *   `count` capping the failures (default: none). Where the stand-in can store (`storable`:
 *   the Blob fault proxy), `storedShare` (0..1) of the failures, drawn from the same generator,
 *   come after the request was carried out: answered `storedStatus` (default 500) after
 *   `storedDelayMs`, or with `storedMode: 'reset'` not answered at all (the answer lost);
 * - outage { seconds, status = 503, retryAfter?, mode = 'status' | 'reset' }: every request
 *   fails for that long (mode 'reset': the connection is dropped without an answer).
 * decide() says what to do with one request: null (go on) or { status, retryAfter, mode }.
 */
export function faultSwitch({ storable = false } = {}) {
  let fault = null;
  let outage = null;
  const counts = { faultsInjected: 0, outageRejected: 0 };
  const activeOutage = () => {
    if (outage && Date.now() >= outage.until) outage = null;
    return outage;
  };
  return {
    setFault(f) {
      if (!f || typeof f !== 'object') throw new Error('fault must be an object');
      const { status = 503, retryAfter, probability, seed } = f;
      const count = f.count ?? (probability === undefined ? 1 : null);
      if (!(Number.isInteger(status) && status >= 400 && status <= 599)) throw new Error('fault.status must be 400..599');
      if (count !== null && (!Number.isInteger(count) || count < 1)) throw new Error('fault.count must be a positive integer');
      if (probability !== undefined && !(typeof probability === 'number' && probability >= 0 && probability <= 1)) throw new Error('fault.probability must be 0..1');
      if (seed !== undefined && (probability === undefined || !Number.isInteger(seed))) throw new Error('fault.seed must be an integer, with a probability');
      const { storedShare, storedStatus = 500, storedDelayMs = 0, storedMode = 'status' } = f;
      if (storedShare !== undefined) {
        if (!storable) throw new Error('fault.storedShare: this stand-in cannot fail after storing');
        if (!(typeof storedShare === 'number' && storedShare >= 0 && storedShare <= 1)) throw new Error('fault.storedShare must be 0..1');
        if (!(Number.isInteger(storedStatus) && storedStatus >= 400 && storedStatus <= 599)) throw new Error('fault.storedStatus must be 400..599');
        if (!(Number.isInteger(storedDelayMs) && storedDelayMs >= 0 && storedDelayMs <= 120_000)) throw new Error('fault.storedDelayMs must be 0..120000');
        if (storedMode !== 'status' && storedMode !== 'reset') throw new Error("fault.storedMode must be 'status' or 'reset'");
      }
      fault = { status, retryAfter, remaining: count, probability, seed: probability === undefined ? undefined : (seed ?? 1) };
      if (storedShare !== undefined) Object.assign(fault, { storedShare, storedStatus, storedDelayMs, storedMode });
      Object.defineProperty(fault, 'draw', { value: seededRandom(seed ?? 1) });
      return fault;
    },
    clearFault() { fault = null; },
    setOutage(o) {
      if (!o || typeof o !== 'object') throw new Error('outage must be an object');
      const { seconds, status = 503, retryAfter, mode = 'status' } = o;
      if (!(typeof seconds === 'number' && seconds > 0 && seconds <= MAX_OUTAGE_SECONDS)) throw new Error(`outage.seconds must be above 0 and at most ${MAX_OUTAGE_SECONDS}`);
      if (!(Number.isInteger(status) && status >= 400 && status <= 599)) throw new Error('outage.status must be 400..599');
      if (mode !== 'status' && mode !== 'reset') throw new Error("outage.mode must be 'status' or 'reset'");
      outage = { status, retryAfter, mode, until: Date.now() + seconds * 1000 };
      return this.outage();
    },
    clearOutage() { outage = null; },
    fault: () => fault,
    outage() {
      const o = activeOutage();
      return o && { status: o.status, retryAfter: o.retryAfter, mode: o.mode, remainingSeconds: Math.max(0, (o.until - Date.now()) / 1000) };
    },
    counts: () => ({ ...counts }),
    resetCounts() { counts.faultsInjected = 0; counts.outageRejected = 0; },
    /**
     * For one request that faults apply to (`faultable`: a fault may hit it; an outage hits all).
     * A fault's decision carries `afterStore` ({ status, delayMs, mode }) when it is to come
     * after the request was carried out.
     */
    decide(faultable = true) {
      const o = activeOutage();
      if (o) {
        counts.outageRejected += 1;
        return { status: o.status, retryAfter: o.retryAfter, mode: o.mode };
      }
      if (!fault || !faultable) return null;
      if (fault.probability !== undefined && fault.draw() >= fault.probability) return null;
      const taken = fault;
      if (fault.remaining !== null) {
        fault.remaining -= 1;
        if (fault.remaining <= 0) fault = null;
      }
      counts.faultsInjected += 1;
      const share = taken.storedShare ?? 0;
      const afterStore = share >= 1 || (share > 0 && taken.draw() < share);
      if (!afterStore) return { status: taken.status, retryAfter: taken.retryAfter, mode: 'status' };
      // The stand-in counts it when it applies it (only once the backend took the request).
      return { status: taken.status, retryAfter: taken.retryAfter, mode: 'status', afterStore: { status: taken.storedStatus, delayMs: taken.storedDelayMs, mode: taken.storedMode } };
    },
  };
}
