import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { packageRoot } from '../../src/util/paths.js';

/**
 * Helpers for the deploy-* tests: reading the manifests under daemonset/,
 * checking objects for fields Kubernetes does not know, evaluating RBAC
 * rules, and the few Dockerfile and .dockerignore facts the tests need.
 */

export const root = packageRoot();
export const deployDir = join(root, 'daemonset');

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [field: string]: unknown;
}

export interface ManifestDoc {
  /** Path relative to the repository root. */
  file: string;
  obj: K8sObject;
}

/** Every *.yaml under a directory, sorted, recursively. */
export function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...yamlFiles(p));
    else if (/\.ya?ml$/.test(e.name)) out.push(p);
  }
  return out.sort();
}

/** The documents of one YAML file; a syntax error or warning fails with the file and line. */
export function loadDocs(file: string): ManifestDoc[] {
  const docs = parseAllDocuments(readFileSync(file, 'utf8'), { prettyErrors: true });
  const rel = relative(root, file);
  return docs.map((d) => {
    const problems = [...d.errors, ...d.warnings];
    if (problems.length > 0) throw new Error(`${rel}: ${problems.map((p) => p.message).join('; ')}`);
    return { file: rel, obj: d.toJS() as K8sObject };
  });
}

export function loadDir(dir: string): ManifestDoc[] {
  return yamlFiles(dir).flatMap(loadDocs);
}

export function find(docs: Array<ManifestDoc | K8sObject>, kind: string, name: string): K8sObject {
  const objs = docs.map((d) => ('obj' in d && 'file' in d ? (d as ManifestDoc).obj : (d as K8sObject)));
  const hit = objs.find((o) => o.kind === kind && o.metadata?.name === name);
  if (!hit) throw new Error(`no ${kind} ${name} among ${docs.length} documents`);
  return hit;
}

/** A nested field by path; undefined when any step is missing. */
export function at<T = unknown>(obj: unknown, ...path: Array<string | number>): T {
  let cur: unknown = obj;
  for (const p of path) cur = cur === null || cur === undefined ? undefined : (cur as Record<string | number, unknown>)[p];
  return cur as T;
}

// ---- unknown fields ----------------------------------------------------------

type AttributeMap = Array<{ baseName: string; type: string }>;
const models = k8s as unknown as Record<string, { getAttributeTypeMap?: () => AttributeMap } | undefined>;

/**
 * Fields of `value` that the Kubernetes type does not declare, as dotted paths.
 * The JSON schemas accept unknown fields (the API server drops or rejects
 * them), so typos are found with the attribute maps of client-node's models,
 * which are generated from the same OpenAPI document.
 */
export function unknownFields(value: unknown, type: string, path = ''): string[] {
  if (value === null || value === undefined) return [];
  const list = /^Array<(.+)>$/.exec(type);
  if (list) return Array.isArray(value) ? value.flatMap((v, i) => unknownFields(v, list[1]!, `${path}[${i}]`)) : [];
  const dict = /^\{ \[key: string\]: (.+); \}$/.exec(type);
  if (dict) return typeof value === 'object' ? Object.entries(value).flatMap(([k, v]) => unknownFields(v, dict[1]!, `${path}.${k}`)) : [];
  const attrs = models[type]?.getAttributeTypeMap?.();
  if (!attrs || typeof value !== 'object') return [];
  return Object.entries(value).flatMap(([k, v]) => {
    const a = attrs.find((x) => x.baseName === k);
    return a ? unknownFields(v, a.type, `${path}.${k}`) : [`${path}.${k}`.slice(1)];
  });
}

/** client-node's model name for a built-in kind: apps/v1 DaemonSet -> V1DaemonSet. */
export function modelName(apiVersion: string, kind: string): string {
  const version = apiVersion.split('/').pop()!;
  return version.charAt(0).toUpperCase() + version.slice(1) + kind;
}

export function hasModel(name: string): boolean {
  return typeof models[name]?.getAttributeTypeMap === 'function';
}

// ---- CRD schemas ---------------------------------------------------------------

export interface JsonSchema {
  type?: string;
  properties?: Record<string, JsonSchema>;
  items?: JsonSchema;
  additionalProperties?: JsonSchema | boolean;
  required?: string[];
  'x-kubernetes-preserve-unknown-fields'?: boolean;
  'x-kubernetes-int-or-string'?: boolean;
  [k: string]: unknown;
}

/**
 * Where a schema is not structural (every level needs a type, unless it
 * preserves unknown fields or is int-or-string); the API server rejects
 * such CRDs. Returns the paths at fault.
 */
export function nonStructural(s: JsonSchema, path = 'openAPIV3Schema'): string[] {
  const out: string[] = [];
  if (!s.type && !s['x-kubernetes-preserve-unknown-fields'] && !s['x-kubernetes-int-or-string']) out.push(`${path}: no type`);
  if (s.properties && s.additionalProperties !== undefined) out.push(`${path}: both properties and additionalProperties`);
  for (const [k, v] of Object.entries(s.properties ?? {})) out.push(...nonStructural(v, `${path}.properties.${k}`));
  if (s.items) out.push(...nonStructural(s.items, `${path}.items`));
  if (typeof s.additionalProperties === 'object') out.push(...nonStructural(s.additionalProperties, `${path}.additionalProperties`));
  if (s.type === 'array' && !s.items) out.push(`${path}: array without items`);
  return out;
}

/** Fields the API server would prune from a custom resource: not declared by its schema. */
export function prunedFields(value: unknown, s: JsonSchema, path = ''): string[] {
  if (s['x-kubernetes-preserve-unknown-fields'] || value === null || typeof value !== 'object') return [];
  if (Array.isArray(value)) return s.items ? value.flatMap((v, i) => prunedFields(v, s.items!, `${path}[${i}]`)) : [];
  return Object.entries(value).flatMap(([k, v]) => {
    const sub = s.properties?.[k] ?? (typeof s.additionalProperties === 'object' ? s.additionalProperties : undefined);
    if (!sub) return ['apiVersion', 'kind', 'metadata'].includes(k) && path === '' ? [] : [`${path}.${k}`.slice(1)];
    return prunedFields(v, sub, `${path}.${k}`);
  });
}

// ---- RBAC ------------------------------------------------------------------------

export interface PolicyRule {
  apiGroups?: string[];
  resources?: string[];
  verbs: string[];
  resourceNames?: string[];
}

export interface ApiRequest {
  verb: string;
  group: string;
  /** resource, or resource/subresource */
  resource: string;
  namespace: string;
  name: string;
}

/**
 * The authorizer's view of one REST request, the way the API server derives
 * it: GET on a collection is list (watch with ?watch=true), a metadata.name
 * field selector names the object for list and watch.
 */
export function requestInfo(method: string, path: string, query: Record<string, string>): ApiRequest | undefined {
  const parts = path.split('?')[0]!.split('/').filter(Boolean);
  let group: string;
  let rest: string[];
  if (parts[0] === 'api' && parts[1] === 'v1') [group, rest] = ['', parts.slice(2)];
  else if (parts[0] === 'apis' && parts.length >= 3) [group, rest] = [parts[1]!, parts.slice(3)];
  else return undefined;
  let namespace = '';
  if (rest[0] === 'namespaces' && rest.length >= 3) {
    namespace = rest[1]!;
    rest = rest.slice(2);
  }
  const [resource, name = '', sub] = rest;
  if (!resource) return undefined;
  const fieldName = /(?:^|,)metadata\.name=([^,]+)/.exec(query.fieldSelector ?? '')?.[1] ?? '';
  const watch = query.watch === 'true' || query.watch === '1';
  const verb =
    method === 'GET' ? (name ? 'get' : watch ? 'watch' : 'list') : method === 'POST' ? 'create' : method === 'PUT' ? 'update' : method === 'PATCH' ? 'patch' : method === 'DELETE' ? (name ? 'delete' : 'deletecollection') : method.toLowerCase();
  return { verb, group, resource: sub ? `${resource}/${sub}` : resource, namespace, name: name || fieldName };
}

export function ruleAllows(rule: PolicyRule, r: ApiRequest): boolean {
  const has = (list: string[] | undefined, v: string) => (list ?? []).includes(v) || (list ?? []).includes('*');
  if (!has(rule.apiGroups, r.group) || !has(rule.resources, r.resource) || !has(rule.verbs, r.verb)) return false;
  return !rule.resourceNames?.length || (r.name !== '' && rule.resourceNames.includes(r.name));
}

// ---- Dockerfile and build context -------------------------------------------------

/**
 * Docker's .dockerignore matching for the patterns this project uses: a
 * pattern (with * inside a path segment) matches a path or any of its
 * parents, anchored at the context root; `!` re-includes.
 */
export function dockerIgnored(patterns: string[], path: string): boolean {
  const segs = path.replace(/^\.\//, '').replace(/\/$/, '').split('/');
  let ignored = false;
  for (const raw of patterns) {
    const negate = raw.startsWith('!');
    const pat = (negate ? raw.slice(1) : raw).replace(/^\/|\/$/g, '');
    const psegs = pat.split('/');
    const seg = (p: string, s: string) => new RegExp(`^${p.split('*').map((x) => x.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^/]*')}$`).test(s);
    const hit = psegs.length <= segs.length && psegs.every((p, i) => seg(p, segs[i]!));
    if (hit) ignored = !negate;
  }
  return ignored;
}

export function readDockerignore(): string[] {
  return readFileSync(join(root, '.dockerignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
}

/** Files a COPY source names (a file, a non-empty directory, or a * glob in the last segment). */
export function sourceFiles(base: string, src: string): string[] {
  const clean = src.replace(/\/$/, '');
  const star = clean.lastIndexOf('/');
  const last = clean.slice(star + 1);
  if (last.includes('*')) {
    const dir = join(base, clean.slice(0, Math.max(star, 0)));
    const re = new RegExp(`^${last.split('*').map((x) => x.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`);
    return existsSync(dir) ? readdirSync(dir).filter((f) => re.test(f)).map((f) => join(dir, f)) : [];
  }
  const p = join(base, clean);
  if (!existsSync(p)) return [];
  return statSync(p).isDirectory() ? walk(p) : [p];
}

function walk(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : [join(dir, e.name)]));
}

// ---- shell scripts in manifests -----------------------------------------------------

/** Run a manifest's shell script with /bin/sh and the given environment (and no other). */
export function runScript(script: string, env: Record<string, string>): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('/bin/sh', ['-c', script], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env }, encoding: 'utf8' });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}
