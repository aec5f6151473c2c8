import { errorMessage } from '../errors.js';
import { logger } from '../util/log.js';
import { CONTROLLER_NAME } from './objects.js';
import type { GatewayResolution } from './resolve.js';
import { gatewayStatusPatches, type StatusPatch } from './status.js';

const log = logger('gateway-status');

/** The part of client-node's CustomObjectsApi the writer uses (a fake in tests). */
export interface StatusApi {
  patchClusterCustomObjectStatus(p: { group: string; version: string; plural: string; name: string; body: unknown }, options?: unknown): Promise<unknown>;
  patchNamespacedCustomObjectStatus(p: { group: string; version: string; namespace: string; plural: string; name: string; body: unknown }, options?: unknown): Promise<unknown>;
}

/**
 * Writes Gateway API status (cluster mode) after each compile: only what
 * changed (status.ts compares with the informer's copy), one write at a time,
 * the latest resolution winning over one queued before it. Best effort: a
 * failed write is logged and tried again at the next change.
 */
export class GatewayStatusWriter {
  private running = false;
  private next: (() => StatusPatch[]) | undefined;

  constructor(
    private readonly api: StatusApi,
    /** client-node's request options that make the patch a JSON merge patch (setHeaderOptions, given by the caller so this module does not load client-node). */
    private readonly mergePatch: unknown,
    private readonly controllerName = CONTROLLER_NAME,
    private readonly now: () => Date = () => new Date(),
  ) {}

  update(r: GatewayResolution, current: Parameters<typeof gatewayStatusPatches>[1]): void {
    this.next = () => gatewayStatusPatches(r, current, this.now(), this.controllerName);
    if (!this.running) void this.drain();
  }

  /** Resolves when nothing is queued (tests). */
  async idle(): Promise<void> {
    while (this.running) await new Promise((r) => setTimeout(r, 5));
  }

  private async drain(): Promise<void> {
    this.running = true;
    try {
      while (this.next) {
        const patches = this.next();
        this.next = undefined;
        for (const p of patches) await this.write(p);
      }
    } finally {
      this.running = false;
    }
  }

  private async write(p: StatusPatch): Promise<void> {
    const body = { status: p.status };
    // A merge patch: the status lists (conditions, listeners, parents) are replaced whole.
    const options = this.mergePatch;
    try {
      if (p.namespace === '') await this.api.patchClusterCustomObjectStatus({ group: p.group, version: p.version, plural: p.plural, name: p.name, body }, options);
      else await this.api.patchNamespacedCustomObjectStatus({ group: p.group, version: p.version, namespace: p.namespace, plural: p.plural, name: p.name, body }, options);
      log.debug({ kind: p.kind, namespace: p.namespace, name: p.name }, 'status written');
    } catch (err) {
      log.warn({ kind: p.kind, namespace: p.namespace, name: p.name, err: errorMessage(err) }, 'could not write Gateway API status; will try again at the next change');
    }
  }
}
