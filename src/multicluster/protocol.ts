import { createHash } from 'node:crypto';
import { z } from 'zod';
import { FSMN_MC_API_VERSION, ImportPortSchema, ImportTypeSchema } from './api.js';
import type { ClusterExport } from './merge.js';

/**
 * What one controller tells its peers (GET /v1/clusterset/exports): its
 * cluster id and, per exported service, what the KEP's merge needs plus what
 * the data path needs to reach it (ready endpoint count, the gateway node
 * proxies). No pod address, no node policy, nothing else of the cluster.
 *
 * The long-poll is the node policy protocol's (docs/controller.md): the
 * version is a content hash, `If-None-Match` + `?wait=` parks the request
 * until the version changes, and `A-IM: fsm-exports-delta` with a version
 * the server remembers gets 226 and only the exports set or removed since.
 */

export const EXPORTS_DELTA_IM = 'fsm-exports-delta';

const Name = z.string().min(1).max(253);
const GatewaySchema = z.string().regex(/^\d{1,3}(\.\d{1,3}){3}:\d{1,5}$/, 'must be IPv4 address:port');

export const ClusterExportSchema = z
  .object({
    cluster: Name,
    namespace: Name,
    name: Name,
    type: ImportTypeSchema,
    ports: z.array(ImportPortSchema),
    sessionAffinity: z.enum(['None', 'ClientIP']),
    exportTime: z.number().int().min(0),
    readyEndpoints: z.number().int().min(0),
    gateways: z.array(GatewaySchema),
    generation: z.number().int().min(0),
  })
  .strict();

export const ExportsDocumentSchema = z
  .object({
    apiVersion: z.literal(FSMN_MC_API_VERSION),
    kind: z.literal('ClusterExports'),
    cluster: Name,
    version: z.string().regex(/^[0-9a-f]{16}$/),
    exports: z.array(ClusterExportSchema),
  })
  .strict();
export type ExportsDocument = z.infer<typeof ExportsDocumentSchema>;

export const ExportsDeltaSchema = z
  .object({
    apiVersion: z.literal(FSMN_MC_API_VERSION),
    kind: z.literal('ClusterExportsDelta'),
    cluster: Name,
    base: z.string().regex(/^[0-9a-f]{16}$/),
    version: z.string().regex(/^[0-9a-f]{16}$/),
    set: z.array(ClusterExportSchema),
    remove: z.array(z.string().min(1)),
    count: z.number().int().min(0),
  })
  .strict();
export type ExportsDelta = z.infer<typeof ExportsDeltaSchema>;

export const exportKey = (e: { namespace: string; name: string }): string => `${e.namespace}/${e.name}`;

/** The document for `exports` (sorted by key here; the version hashes the content). */
export function exportsDocument(cluster: string, exports: readonly ClusterExport[]): ExportsDocument {
  const sorted = [...exports].sort((a, b) => (exportKey(a) < exportKey(b) ? -1 : exportKey(a) > exportKey(b) ? 1 : 0));
  const version = createHash('sha256').update(JSON.stringify([cluster, sorted])).digest('hex').slice(0, 16);
  return { apiVersion: FSMN_MC_API_VERSION, kind: 'ClusterExports', cluster, version, exports: sorted };
}

/** The delta from `base` to `to` (both documents of the same cluster). */
export function exportsDelta(base: ExportsDocument, to: ExportsDocument): ExportsDelta {
  const old = new Map(base.exports.map((e) => [exportKey(e), JSON.stringify(e)]));
  const keys = new Set(to.exports.map(exportKey));
  return {
    apiVersion: FSMN_MC_API_VERSION,
    kind: 'ClusterExportsDelta',
    cluster: to.cluster,
    base: base.version,
    version: to.version,
    set: to.exports.filter((e) => old.get(exportKey(e)) !== JSON.stringify(e)),
    remove: [...old.keys()].filter((k) => !keys.has(k)),
    count: to.exports.length,
  };
}

/** `held` with `delta` applied; undefined when it does not fit (wrong base, count differs): ask for the whole document. */
export function applyExportsDelta(held: ExportsDocument, delta: ExportsDelta): ExportsDocument | undefined {
  if (delta.base !== held.version || delta.cluster !== held.cluster) return undefined;
  const byKey = new Map(held.exports.map((e) => [exportKey(e), e]));
  for (const k of delta.remove) byKey.delete(k);
  for (const e of delta.set) byKey.set(exportKey(e), e);
  if (byKey.size !== delta.count) return undefined;
  const doc = exportsDocument(held.cluster, [...byKey.values()]);
  return doc.version === delta.version ? doc : undefined;
}
